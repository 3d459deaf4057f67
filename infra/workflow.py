"""The Step Functions state machine, generated from the stage registry.

One Batch job state per registry job, each run with the ``.sync`` integration (RUN_JOB: the state
waits for the job), in the shape of the registry's stage graph (:func:`atlas.stages.flow.flow`):
stages that do not build on each other run in the branches of a ``Parallel`` state (today the
OME-TIFF export beside segment -> quantify -> render), the others one after another. An array stage
becomes an array job followed by its ``-merge`` job; its size comes from the execution input at run
time (``ArrayProperties.Size`` = ``$.sizes.<stage>.items``, which the trigger computed from the
slide's size with the registry's sizing; :func:`atlas.stages.execution_sizes`), and the items and
the merge get it as the ``items`` parameter. So do each job's resources: SubmitJob overrides the job
definition's vCPUs and memory (``ContainerOverrides.ResourceRequirements``, strings formatted from
``$.sizes.<job>.vcpus`` and ``.memory_mib``) and its attempt timeout (``Timeout.AttemptDurationSeconds``
= ``$.sizes.<job>.timeout_s``), and the job learns its vCPUs as the ``vcpus`` parameter (its thread
pools follow it). The job definitions keep the registry's defaults. Each job gets the execution
input's ``slide_uri``, ``work_uri`` and ``run_id`` as Batch parameters and ``slide_id``/``run_id``
as tags.

Failure: every job state catches any error into a Fail state whose error and cause are the
job's, so the execution's FAILED event carries them (inside a branch, that Fail state fails the
branch and so the Parallel state, whose catch ends the run in a Fail state passing the same error
and cause on, the other branches stopped); the status Lambda records that event in
the catalog and notifies the lab (SNS), and the failed-executions alarm tells ops. With Spot on,
a job that its Spot queue cancelled for lack of capacity (``CAPACITY:INSUFFICIENT_INSTANCE_CAPACITY``
in its status reason) is first resubmitted to the on-demand-only queue of its kind.
Execution names are the run ids chosen by the trigger (a duplicate start is refused by AWS).

The state machine's role holds exactly what AWS documents for the ``.sync`` Batch integration
with tags (SubmitJob on this app's queues and job definitions, TagResource for tag-on-create,
DescribeJobs, TerminateJob so that stopping an execution ends its job, and the managed events
rule), plus log delivery and X-Ray; CDK's own generated statements are not used. Its log group
is under ``/aws/vendedlogs/states/`` (CloudWatch Logs resource-policy size limit in busy accounts).
"""
from __future__ import annotations

from aws_cdk import Duration, RemovalPolicy, Size, Stack, Token
from aws_cdk import aws_iam as iam
from aws_cdk import aws_logs as logs
from aws_cdk import aws_stepfunctions as sfn
from aws_cdk import aws_stepfunctions_tasks as tasks
from constructs import Construct

from atlas.stages import Stage
from atlas.stages.flow import Flow, flow
from infra.compute import (
    CAPACITY_CANCELLED,
    ITEMS_PARAMETER,
    JOB_PARAMETERS,
    QUEUE_TIME_LIMITS,
    SPOT_ATTEMPTS,
    VCPUS_PARAMETER,
    StageJob,
)
from infra.config import AtlasConfig
from infra.nag import acknowledge_wildcards

# Fields of the execution input (atlas.aws.catalog.execution_input) each job gets as tags.
JOB_TAGS = ("slide_id", "run_id")
FAILURE_PATH = "$.failure"
# The rule Step Functions manages to learn when a .sync Batch job ends (AWS-documented name).
BATCH_EVENTS_RULE = "StepFunctionsGetEventsForBatchJobsRule"
# Log delivery of Step Functions to CloudWatch Logs and X-Ray tracing: AWS-documented actions,
# none with resource-level permissions.
LOG_DELIVERY_ACTIONS = ("logs:CreateLogDelivery", "logs:GetLogDelivery", "logs:UpdateLogDelivery",
                        "logs:DeleteLogDelivery", "logs:ListLogDeliveries", "logs:PutResourcePolicy",
                        "logs:DescribeResourcePolicies", "logs:DescribeLogGroups")
XRAY_ACTIONS = ("xray:PutTraceSegments", "xray:PutTelemetryRecords", "xray:GetSamplingRules",
                "xray:GetSamplingTargets")


def items_path(job: StageJob) -> str:
    """Where the execution input says how many items the job's array stage runs."""
    return f"$.sizes.{job.stage.name}.items"


def size_path(job: StageJob, field: str) -> str:
    """Where the execution input gives the job's ``vcpus``, ``memory_mib`` or ``timeout_s``."""
    return f"$.sizes.{job.name}.{field}"


def as_text(path: str) -> str:
    """A number of the execution input as the string a Batch parameter or resource value must be."""
    return sfn.JsonPath.format("{}", sfn.JsonPath.string_at(path))


def run_timeout(jobs: list[StageJob]) -> Duration:
    """Longest legitimate run: every job at its timeout on every Spot attempt, after waiting in
    the queue as long as the queue allows (twice where a capacity shortage sends it on to the
    on-demand queue), plus an hour of slack."""
    queue_wait = max(d.to_seconds() for d in QUEUE_TIME_LIMITS.values())
    seconds = sum((job.stage.timeout_s + queue_wait * (2 if job.on_demand_queue else 1)) * SPOT_ATTEMPTS
                  for job in jobs)
    return Duration.seconds(seconds + 3600)


class Pipeline(Construct):
    """The state machine driving one run of one slide through every stage.

    Attributes
    ----------
    state_machine : sfn.StateMachine
    role : iam.Role
        The state machine's role; its only policy is ``policy``.
    policy : iam.Policy
    job_states : list of tasks.BatchSubmitJob
        In registry order (merge jobs after their array job; parallel branches one after another).
    parallel_states : list of sfn.Parallel
        One per step of parallel branches in the stage graph.
    on_demand_states : dict of str to tasks.BatchSubmitJob
        By job name: the resubmission of a capacity-cancelled job to its on-demand-only queue.
    """

    def __init__(self, scope: Construct, id: str, *, config: AtlasConfig, jobs: list[StageJob]) -> None:
        super().__init__(scope, id)
        self.on_demand_states: dict[str, tasks.BatchSubmitJob] = {}
        self.job_states: list[tasks.BatchSubmitJob] = []
        self.parallel_states: list[sfn.Parallel] = []
        start, exits = self._chain(flow(), jobs)
        published = sfn.Succeed(self, "Published")
        for previous in exits:
            previous.next(published)

        self.role = iam.Role(self, "Role", assumed_by=iam.ServicePrincipal("states.amazonaws.com"),
                             description="Step Functions: run the stage jobs on Batch, deliver logs and traces")
        self.policy = self._policy(config, jobs)
        self.state_machine = sfn.StateMachine(
            self, "StateMachine", state_machine_name=config.name("pipeline"),
            comment="Runs one slide through the registry's stages as AWS Batch jobs (atlas stage NAME)",
            definition_body=sfn.DefinitionBody.from_chainable(start), timeout=run_timeout(jobs),
            tracing_enabled=True, role=self.role.without_policy_updates(),
            logs=sfn.LogOptions(destination=logs.LogGroup(
                self, "ExecutionLogs", log_group_name=f"/aws/vendedlogs/states/{config.name('pipeline')}",
                retention=config.log_retention, removal_policy=RemovalPolicy.RETAIN),
                level=sfn.LogLevel.ALL, include_execution_data=True))
        # CreateStateMachine checks that the role may deliver logs: the policy must exist first.
        self.state_machine.node.add_dependency(self.policy)

    def _policy(self, config: AtlasConfig, jobs: list[StageJob]) -> iam.Policy:
        """What AWS documents for the .sync Batch integration with tags, scoped to this app's jobs and queues."""
        stack = Stack.of(self)
        queues = {id(q): q for job in jobs for q in (job.queue, job.on_demand_queue) if q is not None}
        definitions = [stack.format_arn(service="batch", resource="job-definition",
                                        resource_name=f"{config.name(job.name)}:*") for job in jobs]
        batch_jobs = stack.format_arn(service="batch", resource="job", resource_name="*")
        policy = iam.Policy(self, "Policy", roles=[self.role], statements=[
            iam.PolicyStatement(sid="SubmitStageJobs", actions=["batch:SubmitJob"],
                                resources=[*(q.job_queue_arn for q in queues.values()), *definitions, batch_jobs]),
            # SubmitJob with Tags is also authorized as TagResource (tag on create).
            iam.PolicyStatement(sid="TagStageJobsOnSubmit", actions=["batch:TagResource"], resources=[batch_jobs]),
            # Stopping or timing out an execution terminates its job.
            iam.PolicyStatement(sid="EndStageJobs", actions=["batch:TerminateJob"], resources=[batch_jobs]),
            iam.PolicyStatement(sid="WatchStageJobs", actions=["batch:DescribeJobs"], resources=["*"]),
            iam.PolicyStatement(sid="BatchJobEventsRule",
                                actions=["events:PutTargets", "events:PutRule", "events:DescribeRule"],
                                resources=[stack.format_arn(service="events", resource="rule",
                                                            resource_name=BATCH_EVENTS_RULE)]),
            iam.PolicyStatement(sid="DeliverLogs", actions=list(LOG_DELIVERY_ACTIONS), resources=["*"]),
            iam.PolicyStatement(sid="Trace", actions=list(XRAY_ACTIONS), resources=["*"]),
        ])
        acknowledge_wildcards(
            policy, "AWS's documented policy for Step Functions' Batch .sync integration: job ids exist only at run "
            "time (job/*), job definition revisions change on every deploy (<name>:*), DescribeJobs, log delivery "
            "and X-Ray actions have no resource-level permissions.", resources=["*", batch_jobs, *definitions])
        return policy

    def _chain(self, steps: Flow, jobs: list[StageJob]) -> tuple[sfn.State, list[sfn.INextable]]:
        """The states of ``steps`` chained one after another: the first, and those the run goes on from."""
        start: sfn.State | None = None
        exits: list[sfn.INextable] = []
        for step in steps:
            if isinstance(step, Stage):
                states = [self._job_states(job) for job in jobs if job.stage is step]
            else:
                states = [self._parallel(step, jobs)]
            for state, state_exits in states:
                for previous in exits:
                    previous.next(state)
                start, exits = start or state, state_exits
        return start, exits

    def _parallel(self, branches: tuple[Flow, ...], jobs: list[StageJob]) -> tuple[sfn.Parallel, list[sfn.INextable]]:
        """A Parallel state running each branch's chain; its input passes on unchanged, and a failed
        branch (its job's Fail state) ends the run with that job's error and cause."""
        heads = " | ".join(_first(branch).name for branch in branches)  # "export | segment"
        parallel = sfn.Parallel(self, heads, result_path=sfn.JsonPath.DISCARD,
                                comment="stages that do not build on each other, side by side")
        for branch in branches:
            parallel.branch(self._chain(branch, jobs)[0])
        failed = sfn.Fail(self, f"{heads} failed", error_path=f"{FAILURE_PATH}.Error",
                          cause_path=f"{FAILURE_PATH}.Cause")
        parallel.add_catch(failed, errors=[sfn.Errors.ALL], result_path=FAILURE_PATH)
        self.parallel_states.append(parallel)
        return parallel, [parallel]

    def _job_states(self, job: StageJob) -> tuple[tasks.BatchSubmitJob, list[sfn.INextable]]:
        """The job's state and the states the run goes on from (the job, and its on-demand resubmission)."""
        failed = sfn.Fail(self, f"{job.name} failed",
                          error_path=sfn.JsonPath.format(f"{job.name} failed: {{}}",
                                                         sfn.JsonPath.string_at(f"{FAILURE_PATH}.Error")),
                          cause_path=f"{FAILURE_PATH}.Cause")
        state = self._submit(job.name, job, job.queue, failed if job.on_demand_queue is None else None)
        self.job_states.append(state)
        if job.on_demand_queue is None:
            return state, [state]
        on_demand = self._submit(f"{job.name} on-demand", job, job.on_demand_queue, failed)
        self.on_demand_states[job.name] = on_demand
        capacity = sfn.Choice(self, f"{job.name} lacked capacity?").when(
            sfn.Condition.string_matches(f"{FAILURE_PATH}.Cause", f"*{CAPACITY_CANCELLED}*"), on_demand
        ).otherwise(failed)
        state.add_catch(capacity, errors=[sfn.Errors.ALL], result_path=FAILURE_PATH)
        return state, [state, on_demand]

    def _submit(self, state_name: str, job: StageJob, queue, failed: sfn.Fail | None) -> tasks.BatchSubmitJob:
        payload = {p: sfn.JsonPath.string_at(f"$.{p}") for p in JOB_PARAMETERS}
        payload[VCPUS_PARAMETER] = as_text(size_path(job, "vcpus"))  # a Batch parameter is a string
        if job.stage.array_size:  # the items and the merge learn the array's size
            payload[ITEMS_PARAMETER] = as_text(items_path(job))
        state = tasks.BatchSubmitJob(
            self, state_name,
            job_name=sfn.JsonPath.format(f"{{}}-{job.name}", sfn.JsonPath.string_at("$.run_id")),
            job_definition_arn=job.definition.job_definition_arn, job_queue_arn=queue.job_queue_arn,
            array_size=sfn.JsonPath.number_at(items_path(job)) if job.array_size else None,
            # this slide's resources over the job definition's defaults (Batch wants the values as strings)
            container_overrides=tasks.BatchContainerOverrides(
                vcpus=Token.as_number(as_text(size_path(job, "vcpus"))),
                memory=Size.mebibytes(Token.as_number(as_text(size_path(job, "memory_mib"))))),
            task_timeout=sfn.Timeout.at(size_path(job, "timeout_s")),  # Batch's Timeout.AttemptDurationSeconds
            integration_pattern=sfn.IntegrationPattern.RUN_JOB, payload=sfn.TaskInput.from_object(payload),
            tags={t: sfn.JsonPath.string_at(f"$.{t}") for t in JOB_TAGS},
            # The input passes on unchanged: a job's description (large for array jobs) is not needed.
            result_path=sfn.JsonPath.DISCARD)
        # SubmitJob throttling or a transient Batch API error is retried; a failed job is not.
        state.add_retry(errors=["Batch.AWSBatchException"], interval=Duration.seconds(10), max_attempts=5,
                        backoff_rate=2.0)
        if failed is not None:
            state.add_catch(failed, errors=[sfn.Errors.ALL], result_path=FAILURE_PATH)
        return state


def _first(steps: Flow) -> Stage:
    """The first stage a chain of steps runs."""
    step = steps[0]
    return step if isinstance(step, Stage) else _first(step[0])
