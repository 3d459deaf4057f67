"""The state machine is the stage registry: one Batch .sync job state per registry job, in order."""
from __future__ import annotations

import json
import re

from cdk_templates import logical_id, one, policy_statements, resources, state_machine_definition

from atlas.aws.catalog import execution_input
from atlas.stages import HOST_MEMORY_MIB, STAGES, SlideSize, batch_jobs, execution_sizes, get_stage
from infra.nag import render_intrinsics
from infra.workflow import run_timeout

EXPECTED_JOBS = [job.name for job in batch_jobs()]


def all_states(definition: dict) -> dict[str, dict]:
    """Every state by name, those inside Parallel branches included (state names are unique machine-wide)."""
    found = {}
    for name, state in definition["States"].items():
        found[name] = state
        for branch in state.get("Branches", []):
            found.update(all_states(branch))
    return found


def job_states(definition: dict) -> list[tuple[str, dict]]:
    """Task states from StartAt along Next, a Parallel state's branches one after another, in execution
    order (the on-demand resubmissions not included)."""
    states, name, ordered = definition["States"], definition["StartAt"], []
    while states[name]["Type"] in ("Task", "Parallel"):
        state = states[name]
        if state["Type"] == "Task":
            ordered.append((name, state))
        for branch in state.get("Branches", []):
            ordered += job_states(branch)
        if state.get("End"):  # the last state of a branch
            return ordered
        name = state["Next"]
    assert states[name]["Type"] == "Succeed"
    return ordered


def failure_state(definition: dict, state: dict) -> tuple[str, dict]:
    """Where a job state's catch goes when the failure is not a capacity cancellation: its Fail state."""
    (catch,) = state["Catch"]
    name = catch["Next"]
    states = all_states(definition)
    if states[name]["Type"] == "Choice":
        name = states[name]["Default"]
    return name, states[name]


def resolve(value: str, execution: dict):
    """What Step Functions makes of a ``.$`` value (a path, or ``States.Format('{}', path)``) for ``execution``."""
    formatted = re.fullmatch(r"States\.Format\('\{\}', (\$\.[\w.-]+)\)", value)
    path = formatted.group(1) if formatted else value
    found = execution
    for key in path[2:].split("."):
        found = found[key]
    return str(found) if formatted else found


TARGET = SlideSize(tiles=1000, cycles=10, channels=40, tile_shape=(2048, 2048))


def test_one_job_state_per_registry_job_in_registry_order(synth):
    names = [name for name, _ in job_states(state_machine_definition(synth.pipeline))]
    assert names == EXPECTED_JOBS == ["illuminate", "illuminate-merge", "align", "mosaic", "mosaic-merge", "export",
                                      "segment", "segment-merge", "quantify", "quantify-merge", "render",
                                      "render-merge", "publish", "publish-merge"]


def test_each_state_runs_its_job_definition_synchronously(synth):
    jobs = synth.pipeline_stack.compute.jobs
    for name, state in job_states(state_machine_definition(synth.pipeline)):
        assert state["Resource"].endswith(":states:::batch:submitJob.sync"), name  # RUN_JOB
        params = state["Parameters"]
        assert params["JobDefinition"] == f"<{logical_id(jobs[name].definition)}>"
        assert params["JobQueue"] == f"<{logical_id(jobs[name].queue)}.JobQueueArn>"
        assert params["JobName.$"] == f"States.Format('{{}}-{name}', $.run_id)"


def test_array_stage_fans_out_by_the_execution_input_then_merges(synth):
    """The array's size is the execution input's (the trigger's sizing of the slide), not a constant:
    the array job's ArrayProperties.Size and the items parameter of its items and merge read it."""
    states = dict(job_states(state_machine_definition(synth.pipeline)))
    target = execution_input(slide_id="S1", run_id="S1-abc", slide_uri="s3://ingest/S1/", work_bucket="work",
                             sizes=execution_sizes(SlideSize(tiles=1000, cycles=10, channels=40,
                                                             tile_shape=(2048, 2048))))
    for stage in STAGES:
        props = states[stage.name]["Parameters"].get("ArrayProperties")
        assert props == ({"Size.$": f"$.sizes.{stage.name}.items"} if stage.array_size else None), stage.name
        if stage.array_size:
            assert states[stage.name]["Next"] == f"{stage.name}-merge"
            assert "ArrayProperties" not in states[f"{stage.name}-merge"]["Parameters"]
            for name in (stage.name, f"{stage.name}-merge"):
                assert states[name]["Parameters"]["Parameters"]["items.$"] == \
                    f"States.Format('{{}}', $.sizes.{stage.name}.items)"
            assert target["sizes"][stage.name]["items"] == stage.sizes(SlideSize(
                tiles=1000, cycles=10, channels=40, tile_shape=(2048, 2048))).items > stage.array_size
        else:
            assert "items.$" not in states[stage.name]["Parameters"]["Parameters"]


def test_gpu_stage_goes_to_the_gpu_queue_only_when_gpu_is_on(full, lean):
    for synth, queue in ((full, "BatchGpuQueue"), (lean, "BatchCpuQueue")):
        states = dict(job_states(state_machine_definition(synth.pipeline)))
        assert states["segment"]["Parameters"]["JobQueue"].startswith(f"<{queue}")
        assert states["segment-merge"]["Parameters"]["JobQueue"].startswith("<BatchCpuQueue")


def test_jobs_get_the_execution_input_as_parameters_and_tags(synth):
    sample = execution_input(slide_id="S1", run_id="S1-abc", slide_uri="s3://ingest/S1/", work_bucket="work")
    for name, state in job_states(state_machine_definition(synth.pipeline)):
        params = state["Parameters"]
        assert {k: v for k, v in params["Parameters"].items() if k not in ("items.$", "vcpus.$")} == {
            "slide_uri.$": "$.slide_uri", "work_uri.$": "$.work_uri", "run_id.$": "$.run_id"}
        assert params["Tags"] == {"slide_id.$": "$.slide_id", "run_id.$": "$.run_id"}
        referenced = {v[2:].split(".")[0] for v in [*params["Parameters"].values(), *params["Tags"].values()]
                      if v.startswith("$.")}
        assert referenced <= set(sample), f"{name} reads a field the trigger does not send"
        assert state["ResultPath"] is None  # the input passes on unchanged


def test_any_failure_is_caught_into_a_fail_state_carrying_the_jobs_error(synth):
    definition = state_machine_definition(synth.pipeline)
    for name, state in job_states(definition):
        (catch,) = state["Catch"]
        assert catch["ErrorEquals"] == ["States.ALL"] and catch["ResultPath"] == "$.failure"
        _, failed = failure_state(definition, state)
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


def test_a_capacity_cancelled_job_is_resubmitted_to_the_on_demand_queue(full):
    """Spot first, never stuck: the queue cancels a job that found no Spot capacity, the state machine
    sends it once more to the on-demand-only queue; any other failure ends the run."""
    definition = state_machine_definition(full.pipeline)
    states = all_states(definition)
    jobs = full.pipeline_stack.compute.jobs
    for name, state in job_states(definition):
        (catch,) = state["Catch"]
        choice = states[catch["Next"]]
        assert choice["Type"] == "Choice"
        (rule,) = choice["Choices"]
        assert rule == {"Variable": "$.failure.Cause", "StringMatches": "*CAPACITY:INSUFFICIENT_INSTANCE_CAPACITY*",
                        "Next": f"{name} on-demand"}
        retry = states[rule["Next"]]
        assert retry["Parameters"]["JobQueue"] == f"<{logical_id(jobs[name].on_demand_queue)}.JobQueueArn>"
        same = ("JobDefinition", "JobName.$", "Parameters", "Tags")
        assert {k: retry["Parameters"][k] for k in same} == {k: state["Parameters"][k] for k in same}
        assert retry.get("Parameters", {}).get("ArrayProperties") == state["Parameters"].get("ArrayProperties")
        # the run (or its branch) goes on from the resubmitted job
        assert (retry.get("Next"), retry.get("End")) == (state.get("Next"), state.get("End"))
        assert failure_state(definition, retry)[0] == failure_state(definition, state)[0]  # a second failure ends it


def test_without_spot_there_is_no_resubmission(lean):
    definition = state_machine_definition(lean.pipeline)
    assert not [n for n, s in all_states(definition).items() if s["Type"] == "Choice" or n.endswith("on-demand")]


def statements_by_sid(synth) -> dict[str, dict]:
    return {s["Sid"]: s for s in policy_statements(synth.pipeline, "PipelinePolicy")}


def test_state_machine_role_holds_what_aws_documents_for_batch_sync_with_tags(synth):
    """SubmitJob with Tags is also authorized as batch:TagResource; .sync watches with DescribeJobs and
    stopping an execution calls TerminateJob (AWS: Step Functions "IAM policies for AWS Batch")."""
    stack = synth.pipeline_stack
    region, account = stack.region, synth.config.account or "<AWS::AccountId>"
    batch_jobs = f"arn:aws:batch:{region}:{account}:job/*"
    statements = {sid: {k: render_intrinsics(v) if k == "Resource" and not isinstance(v, list) else v
                        for k, v in s.items()} for sid, s in statements_by_sid(synth).items()}
    assert statements["TagStageJobsOnSubmit"]["Action"] == "batch:TagResource"
    assert statements["TagStageJobsOnSubmit"]["Resource"] == batch_jobs
    assert statements["EndStageJobs"]["Action"] == "batch:TerminateJob"
    assert statements["EndStageJobs"]["Resource"] == batch_jobs
    assert statements["WatchStageJobs"]["Action"] == "batch:DescribeJobs"
    assert sorted(statements["BatchJobEventsRule"]["Action"]) == ["events:DescribeRule", "events:PutRule",
                                                                  "events:PutTargets"]
    assert statements["BatchJobEventsRule"]["Resource"] == (
        f"arn:aws:events:{region}:{account}:rule/StepFunctionsGetEventsForBatchJobsRule")
    # SubmitJob: this app's queues and job definitions only (not every job definition of the account)
    submit = statements["SubmitStageJobs"]["Resource"]
    compute = stack.compute
    queues = {q for q in (compute.cpu_queue, compute.gpu_queue, *compute.on_demand_queues.values()) if q}
    assert {json.dumps(r) for r in submit if "JobQueueArn" in json.dumps(r)} == {
        json.dumps({"Fn::GetAtt": [logical_id(q), "JobQueueArn"]}) for q in queues}
    definitions = sorted(render_intrinsics(r) for r in submit if ":job-definition/" in json.dumps(r))
    assert definitions == sorted(f"arn:aws:batch:{region}:{account}:job-definition/{synth.config.name(n)}:*"
                                 for n in EXPECTED_JOBS)
    # CDK's generated statements are not used: the role has this one policy
    assert [p for p in resources(synth.pipeline, "AWS::IAM::Policy") if p.startswith("PipelineStateMachine")] == []
    _, machine = one(synth.pipeline, "AWS::StepFunctions::StateMachine", "Pipeline")
    assert machine["Properties"]["RoleArn"] == {"Fn::GetAtt": [logical_id(stack.pipeline.role), "Arn"]}
    assert logical_id(stack.pipeline.policy) in machine["DependsOn"]  # the role may log before the machine exists


def test_execution_logs_go_to_a_vendedlogs_group(synth):
    _, machine = one(synth.pipeline, "AWS::StepFunctions::StateMachine", "Pipeline")
    (destination,) = machine["Properties"]["LoggingConfiguration"]["Destinations"]
    group_id = destination["CloudWatchLogsLogGroup"]["LogGroupArn"]["Fn::GetAtt"][0]
    group = resources(synth.pipeline, "AWS::Logs::LogGroup")[group_id]
    assert group["Properties"]["LogGroupName"] == f"/aws/vendedlogs/states/{synth.config.name('pipeline')}"


def test_export_runs_in_a_parallel_branch_beside_segment_quantify_and_render(synth):
    """The OME-TIFF export needs only the mosaic; segment builds on the mosaic too, so both start once
    it is merged; render (whose overview names the OME-TIFF from the layout) follows quantify in its
    branch; publish waits for both branches, and the release is complete when its merge succeeds."""
    definition = state_machine_definition(synth.pipeline)
    top = definition["States"]
    (name, parallel), = [(n, s) for n, s in top.items() if s["Type"] == "Parallel"]
    branches = [[n for n, _ in job_states(branch)] for branch in parallel["Branches"]]
    assert branches == [["export"], ["segment", "segment-merge", "quantify", "quantify-merge", "render",
                                     "render-merge"]]
    assert get_stage("segment").after == ("mosaic",) and set(get_stage("publish").after) == {"export", "render"}
    assert top["mosaic-merge"]["Next"] == name and parallel["Next"] == "publish"
    assert top["publish"]["Next"] == "publish-merge" and top["publish-merge"]["Next"] == "Published"
    assert parallel["ResultPath"] is None  # publish gets the execution input, not the branches' outputs
    # a failed job fails its branch with its own error; the Parallel state ends the run passing it on
    (catch,) = parallel["Catch"]
    assert catch["ErrorEquals"] == ["States.ALL"] and catch["ResultPath"] == "$.failure"
    assert top[catch["Next"]] == {"Type": "Fail", "ErrorPath": "$.failure.Error", "CausePath": "$.failure.Cause"}
    assert failure_state(definition, all_states(definition)["segment"])[1]["ErrorPath"] == \
        "States.Format('segment failed: {}', $.failure.Error)"


def test_each_job_gets_this_slides_vcpus_memory_and_timeout(synth):
    """SubmitJob overrides the job definition's resources with the execution input's sizes (AWS: Step
    Functions "Run AWS Batch workloads", SubmitJob's ContainerOverrides.ResourceRequirements values are
    strings, Timeout.AttemptDurationSeconds a number), and the job learns its vCPUs as a parameter."""
    execution = execution_input(slide_id="S1", run_id="S1-abc", slide_uri="s3://ingest/S1/", work_bucket="work",
                                sizes=execution_sizes(TARGET))
    jobs = synth.pipeline_stack.compute.jobs
    for name, state in job_states(state_machine_definition(synth.pipeline)):
        params = state["Parameters"]
        assert params["ContainerOverrides"] == {"ResourceRequirements": [
            {"Type": "MEMORY", "Value.$": f"States.Format('{{}}', $.sizes.{name}.memory_mib)"},
            {"Type": "VCPU", "Value.$": f"States.Format('{{}}', $.sizes.{name}.vcpus)"}]}, name
        assert params["Timeout"] == {"AttemptDurationSeconds.$": f"$.sizes.{name}.timeout_s"}, name
        assert "TimeoutSeconds" not in state  # Batch's attempt timeout bounds the job, not the state
        sized = execution["sizes"][name]
        memory, vcpus = (resolve(r["Value.$"], execution) for r in params["ContainerOverrides"]["ResourceRequirements"])
        assert (memory, vcpus) == (str(sized["memory_mib"]), str(sized["vcpus"]))
        assert int(memory) <= HOST_MEMORY_MIB
        assert resolve(params["Timeout"]["AttemptDurationSeconds.$"], execution) == sized["timeout_s"] >= 60
        assert resolve(params["Parameters"]["vcpus.$"], execution) == vcpus
        command = jobs[name].definition.container.command
        assert command[command.index("--vcpus") + 1] == "Ref::vcpus"
    # the target's sizes are not the registry's defaults the job definitions keep
    assert execution["sizes"]["align"]["timeout_s"] > get_stage("align").timeout_s
