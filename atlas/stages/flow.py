"""The stage graph as the state machine runs it: steps in order, some of them parallel branches.

The registry says what each stage builds on (:func:`atlas.stages.dependencies`). Step Functions
runs a graph as a sequence of states, where a ``Parallel`` state runs branches (each a sequence of
its own) side by side and goes on when all have ended. :func:`flow` turns the registry's graph into
that shape, which the state machine (``infra/workflow.py``) and the local executor
(``localcloud.executor``) both follow, so they cannot disagree on what runs beside what.

A stage that every other stage either builds on or builds on it is a step of its own; the stages
between two such steps split into the groups that do not build on each other, one branch each,
and each branch is shaped the same way. For today's registry::

    illuminate, align, mosaic, [export | segment, quantify, render], publish

A graph that cannot be shaped so (two branches that join in one stage and not in another) raises
ValueError: Step Functions has no state for it.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Union

from atlas.stages import STAGES, Stage, ancestors

# A step is a stage, or parallel branches each a Flow of its own.
Step = Union[Stage, "Branches"]
Flow = tuple[Step, ...]
Branches = tuple[Flow, ...]


def flow(stages: Sequence[Stage] = STAGES) -> Flow:
    """The steps that run ``stages`` (in registry order, closed under what lies between them)."""
    related = {s.name: {a.name for a in ancestors(s)} for s in stages}

    def ordered(a: Stage, b: Stage) -> bool:
        return a.name in related[b.name] or b.name in related[a.name]

    steps: list[Step] = []
    between: list[Stage] = []
    for stage in stages:
        if all(ordered(stage, other) for other in stages if other is not stage):
            if between:
                steps.append(branches(between, ordered))
                between = []
            steps.append(stage)
        else:
            between.append(stage)
    if between:
        steps.append(branches(between, ordered))
    return tuple(steps)


def branches(stages: list[Stage], ordered) -> Branches:
    """``stages`` split into the groups that do not build on each other (connected by ``ordered``),
    each shaped by :func:`flow`, in registry order of their first stage."""
    groups: list[list[Stage]] = []
    for stage in stages:
        joined = [g for g in groups if any(ordered(stage, other) for other in g)]
        merged = [s for g in joined for s in g] + [stage]
        groups = [g for g in groups if g not in joined] + [sorted(merged, key=STAGES.index)]
    if len(groups) == 1:
        raise ValueError(f"stages {[s.name for s in stages]} cannot run as parallel branches: some of them join "
                         "in one stage but not in another; make each branch build on its own")
    return tuple(flow(g) for g in sorted(groups, key=lambda g: STAGES.index(g[0])))


def flat(steps: Flow) -> list[Stage]:
    """The stages of ``steps`` in the order one runner running branch after branch runs them."""
    return [s for step in steps for s in ([step] if isinstance(step, Stage) else
                                          [t for branch in step for t in flat(branch)])]
