"""The Step Functions state machine, generated from the stage registry.

One Batch job state per registry stage, in registry order, each run with the ``.sync``
integration (RUN_JOB: the state waits for the job). An array stage becomes an array job over
``array_size`` children followed by its ``-merge`` job. Each job gets the execution input's
``slide_uri``, ``work_uri`` and ``run_id`` as Batch parameters and ``slide_id``/``run_id`` as tags.

Failure: every job state catches any error into a Fail state whose error and cause are the
job's, so the execution's FAILED event carries them; the status Lambda records that event in
the catalog and notifies the lab (SNS), and the failed-executions alarm tells ops.
Execution names are the run ids chosen by the trigger (a duplicate start is refused by AWS).
"""
from __future__ import annotations

from aws_cdk import Duration, RemovalPolicy, Stack
from aws_cdk import aws_logs as logs
from aws_cdk import aws_stepfunctions as sfn
from aws_cdk import aws_stepfunctions_tasks as tasks
from constructs import Construct

from infra.compute import JOB_PARAMETERS, QUEUE_TIME_LIMITS, SPOT_ATTEMPTS, StageJob
from infra.config import AtlasConfig
from infra.nag import acknowledge_wildcards

# The execution input, written by the trigger Lambda (atlas.aws.catalog.execution_input).
EXECUTION_INPUT = ("slide_id", "run_id", "slide_uri", "work_uri")
JOB_TAGS = ("slide_id", "run_id")
FAILURE_PATH = "$.failure"


def run_timeout(jobs: list[StageJob]) -> Duration:
    """Longest legitimate run: every job at its timeout on every Spot attempt, after waiting in
    the queue as long as the queue allows, plus an hour of slack."""
    queue_wait = max(d.to_seconds() for d in QUEUE_TIME_LIMITS.values())
    seconds = sum((job.stage.timeout_s + queue_wait) * SPOT_ATTEMPTS for job in jobs)
    return Duration.seconds(seconds + 3600)


class Pipeline(Construct):
    """The state machine driving one run of one slide through every stage.

    Attributes
    ----------
    state_machine : sfn.StateMachine
    job_states : list of tasks.BatchSubmitJob
        In execution order (registry order, merge jobs after their array job).
    """

    def __init__(self, scope: Construct, id: str, *, config: AtlasConfig, jobs: list[StageJob]) -> None:
        super().__init__(scope, id)
        self.job_states = [self._job_state(job) for job in jobs]
        chain = sfn.Chain.start(self.job_states[0])
        for state in self.job_states[1:]:
            chain = chain.next(state)
        chain = chain.next(sfn.Succeed(self, "Published"))
        self.state_machine = sfn.StateMachine(
            self, "StateMachine", state_machine_name=config.name("pipeline"),
            comment="Runs one slide through the registry's stages as AWS Batch jobs (atlas stage NAME)",
            definition_body=sfn.DefinitionBody.from_chainable(chain), timeout=run_timeout(jobs),
            tracing_enabled=True,
            logs=sfn.LogOptions(destination=logs.LogGroup(
                self, "ExecutionLogs", retention=config.log_retention,
                removal_policy=RemovalPolicy.RETAIN), level=sfn.LogLevel.ALL, include_execution_data=True))
        acknowledge_wildcards(
            self.state_machine, "CDK's policy for Step Functions' Batch .sync integration and execution logging: "
            "job definition ARNs end in a revision that changes on every deploy; log delivery and X-Ray actions "
            "have no resource-level permissions.",
            resources=["*", Stack.of(self).format_arn(service="batch", resource="job-definition", resource_name="*")])

    def _job_state(self, job: StageJob) -> tasks.BatchSubmitJob:
        state = tasks.BatchSubmitJob(
            self, job.name, job_name=sfn.JsonPath.format(f"{{}}-{job.name}", sfn.JsonPath.string_at("$.run_id")),
            job_definition_arn=job.definition.job_definition_arn, job_queue_arn=job.queue.job_queue_arn,
            array_size=job.array_size or None, integration_pattern=sfn.IntegrationPattern.RUN_JOB,
            payload=sfn.TaskInput.from_object({p: sfn.JsonPath.string_at(f"$.{p}") for p in JOB_PARAMETERS}),
            tags={t: sfn.JsonPath.string_at(f"$.{t}") for t in JOB_TAGS},
            # The input passes on unchanged: a job's description (large for array jobs) is not needed.
            result_path=sfn.JsonPath.DISCARD)
        # SubmitJob throttling or a transient Batch API error is retried; a failed job is not.
        state.add_retry(errors=["Batch.AWSBatchException"], interval=Duration.seconds(10), max_attempts=5,
                        backoff_rate=2.0)
        failed = sfn.Fail(self, f"{job.name} failed",
                          error_path=sfn.JsonPath.format(f"{job.name} failed: {{}}",
                                                         sfn.JsonPath.string_at(f"{FAILURE_PATH}.Error")),
                          cause_path=f"{FAILURE_PATH}.Cause")
        state.add_catch(failed, errors=[sfn.Errors.ALL], result_path=FAILURE_PATH)
        return state
