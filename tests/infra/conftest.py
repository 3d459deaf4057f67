"""Fixtures: each configuration of cdk_templates synthesized once per session (see cdk_templates.py)."""
from __future__ import annotations

import pytest
from cdk_templates import FULL, LEAN, Synth, synthesize


@pytest.fixture(scope="session")
def full(tmp_path_factory) -> Synth:
    return synthesize(FULL, tmp_path_factory.mktemp("cdk-full"))


@pytest.fixture(scope="session")
def lean(tmp_path_factory) -> Synth:
    return synthesize(LEAN, tmp_path_factory.mktemp("cdk-lean"))


@pytest.fixture(scope="session", params=["full", "lean"])
def synth(request) -> Synth:
    """Each configuration in turn, for properties that must hold in both."""
    return request.getfixturevalue(request.param)
