"""The state machine is the stage registry: one Batch .sync job state per registry job, in order."""
from __future__ import annotations

from cdk_templates import logical_id, one, state_machine_definition

from atlas.aws.catalog import execution_input
from atlas.stages import STAGES
from infra.compute import job_name
from infra.workflow import run_timeout

EXPECTED_JOBS = [job_name(s, merge=m) for s in STAGES for m in ((False, True) if s.array_size else (False,))]


def job_states(definition: dict) -> list[tuple[str, dict]]:
    """Task states from StartAt along Next, in execution order."""
    states, name, ordered = definition["States"], definition["StartAt"], []
    while states[name]["Type"] == "Task":
        ordered.append((name, states[name]))
        name = states[name]["Next"]
    assert states[name]["Type"] == "Succeed"
    return ordered


def test_one_job_state_per_registry_job_in_registry_order(synth):
    names = [name for name, _ in job_states(state_machine_definition(synth.pipeline))]
    assert names == EXPECTED_JOBS == ["stitch", "segment", "segment-merge", "quantify", "render", "publish"]


def test_each_state_runs_its_job_definition_synchronously(synth):
    jobs = synth.pipeline_stack.compute.jobs
    for name, state in job_states(state_machine_definition(synth.pipeline)):
        assert state["Resource"].endswith(":states:::batch:submitJob.sync"), name  # RUN_JOB
        params = state["Parameters"]
        assert params["JobDefinition"] == f"<{logical_id(jobs[name].definition)}>"
        assert params["JobQueue"] == f"<{logical_id(jobs[name].queue)}.JobQueueArn>"
        assert params["JobName.$"] == f"States.Format('{{}}-{name}', $.run_id)"


def test_array_stage_fans_out_then_merges(synth):
    states = dict(job_states(state_machine_definition(synth.pipeline)))
    for stage in STAGES:
        props = states[stage.name]["Parameters"].get("ArrayProperties")
        assert props == ({"Size": stage.array_size} if stage.array_size else None), stage.name
        if stage.array_size:
            assert states[stage.name]["Next"] == f"{stage.name}-merge"
            assert "ArrayProperties" not in states[f"{stage.name}-merge"]["Parameters"]


def test_gpu_stage_goes_to_the_gpu_queue_only_when_gpu_is_on(full, lean):
    for synth, queue in ((full, "BatchGpuQueue"), (lean, "BatchCpuQueue")):
        states = dict(job_states(state_machine_definition(synth.pipeline)))
        assert states["segment"]["Parameters"]["JobQueue"].startswith(f"<{queue}")
        assert states["segment-merge"]["Parameters"]["JobQueue"].startswith("<BatchCpuQueue")


def test_jobs_get_the_execution_input_as_parameters_and_tags(synth):
    sample = execution_input(slide_id="S1", run_id="S1-abc", slide_uri="s3://ingest/S1/", work_bucket="work")
    for name, state in job_states(state_machine_definition(synth.pipeline)):
        params = state["Parameters"]
        assert params["Parameters"] == {"slide_uri.$": "$.slide_uri", "work_uri.$": "$.work_uri",
                                        "run_id.$": "$.run_id"}
        assert params["Tags"] == {"slide_id.$": "$.slide_id", "run_id.$": "$.run_id"}
        referenced = {v[2:] for v in [*params["Parameters"].values(), *params["Tags"].values()]}
        assert referenced <= set(sample), f"{name} reads a field the trigger does not send"
        assert state["ResultPath"] is None  # the input passes on unchanged


def test_any_failure_is_caught_into_a_fail_state_carrying_the_jobs_error(synth):
    definition = state_machine_definition(synth.pipeline)
    for name, state in job_states(definition):
        (catch,) = state["Catch"]
        assert catch["ErrorEquals"] == ["States.ALL"] and catch["ResultPath"] == "$.failure"
        failed = definition["States"][catch["Next"]]
        assert failed == {"Type": "Fail", "ErrorPath": f"States.Format('{name} failed: {{}}', $.failure.Error)",
                          "CausePath": "$.failure.Cause"}
        # only a Batch API hiccup is retried by Step Functions; a failed job is not rerun
        assert [r["ErrorEquals"] for r in state["Retry"]] == [["Batch.AWSBatchException"]]


def test_state_machine_is_named_logged_traced_and_bounded(synth):
    _, machine = one(synth.pipeline, "AWS::StepFunctions::StateMachine", "Pipeline")
    props = machine["Properties"]
    assert props["StateMachineName"] == synth.config.name("pipeline")
    assert props["LoggingConfiguration"]["Level"] == "ALL"
    assert props["TracingConfiguration"] == {"Enabled": True}
    timeout = state_machine_definition(synth.pipeline)["TimeoutSeconds"]
    jobs = list(synth.pipeline_stack.compute.jobs.values())
    assert timeout == run_timeout(jobs).to_seconds() > sum(job.stage.timeout_s for job in jobs)
