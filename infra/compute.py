"""AWS Batch: where the stage containers run, with one job definition per registry stage.

CPU jobs go to a queue that fills a Spot compute environment first and an on-demand one when
Spot is at its vCPU ceiling; GPU stages get a GPU queue of the same shape (ECS AL2023 NVIDIA
AMI) when ``gpu`` is on, and otherwise run on the CPU queue with the CPU image. With Spot on,
each kind also has an on-demand-only queue: a job the Spot queue cancelled for lack of capacity
is resubmitted there by the state machine (Spot first, never stuck). A job retries only when its
Spot instance was reclaimed: any other failure is real and is reported, not silently rerun. Jobs
propagate their tags (slide_id, run_id) to the ECS tasks for cost per slide.

Two job roles: every stage reads the ingest bucket and reads/writes the work bucket; only the
publish job's role may add objects to the results bucket and the overview site (and read them, for the
portal).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from aws_cdk import Duration, Size
from aws_cdk import aws_batch as batch
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_ecr_assets as ecr_assets
from aws_cdk import aws_ecs as ecs
from aws_cdk import aws_iam as iam
from aws_cdk import aws_logs as logs
from aws_cdk import aws_s3 as s3
from constructs import Construct

from atlas.stages import Job, Stage, batch_jobs
from infra.config import AtlasConfig
from infra.nag import S3_READ_ACTIONS, acknowledge, acknowledge_wildcards, managed_policy_finding

REPO_ROOT = Path(__file__).resolve().parents[1]

# Build arguments of containers/*/Dockerfile for the segmentation weights baked into the images.
UNET_WEIGHTS_URL_ARG = "UNET_WEIGHTS_URI"
UNET_WEIGHTS_SHA256_ARG = "UNET_WEIGHTS_SHA256"

# Batch parameters filled in per job by Step Functions (the execution input's fields).
JOB_PARAMETERS = ("slide_uri", "work_uri", "run_id")
# ... and, for an array stage's items and merge, the array's size in this run (its ``sizes``).
ITEMS_PARAMETER = "items"
# ... and the vCPUs this run gives the job (its ``sizes``; SubmitJob overrides the definition's with them).
VCPUS_PARAMETER = "vcpus"

# Attempts per job; only Spot reclaims are retried (see retry strategies below).
SPOT_ATTEMPTS = 3

# Jobs stuck RUNNABLE at the head of a queue are cancelled, so the run fails with a reason
# instead of waiting forever: at once for impossible requests, later for a capacity shortage
# (on a Spot queue the state machine then resubmits the job to the on-demand-only queue).
QUEUE_TIME_LIMITS = {
    batch.JobStateTimeLimitActionsReason.JOB_RESOURCE_REQUIREMENT: Duration.minutes(10),
    batch.JobStateTimeLimitActionsReason.COMPUTE_ENVIRONMENT_MAX_RESOURCE: Duration.minutes(10),
    batch.JobStateTimeLimitActionsReason.INSUFFICIENT_INSTANCE_CAPACITY: Duration.hours(1),
}
# What Batch writes into a job's statusReason when the time limit above cancels it for capacity
# (docs: AWS Batch user guide, "Jobs stuck in RUNNABLE due to capacity").
CAPACITY_CANCELLED = "CAPACITY:INSUFFICIENT_INSTANCE_CAPACITY"


def stage_command(job: Job) -> list[str]:
    """The container command of a stage job, ``stage NAME --slide-uri Ref::slide_uri ... [--merge] --vcpus ...``.

    The images' entrypoint is ``atlas``, so the job runs ``atlas stage NAME ...``. Values come
    from Batch parameters (``Ref::name``) that Step Functions passes per run; array children
    find their index in ``AWS_BATCH_JOB_ARRAY_INDEX``. The vCPUs come as a parameter too: Batch
    sets no variable for them, and on EC2 a job's vCPUs are CPU shares, a relative weight, not a
    quota the container could read from its cgroup (it sees every CPU of the host).
    """
    return job.argv(**{name: f"Ref::{name}" for name in JOB_PARAMETERS}, items=f"Ref::{ITEMS_PARAMETER}",
                    vcpus=f"Ref::{VCPUS_PARAMETER}")


@dataclass(frozen=True)
class StageJob:
    """A job definition and the queue it is submitted to.

    Attributes
    ----------
    job : Job
        The registry job it runs; for an array stage, its first item stands for the array job.
    array_size : int
        Batch array size (0: a single job).
    on_demand_queue : JobQueue or None
        Where a capacity-cancelled job is resubmitted.
    """

    job: Job
    definition: batch.EcsJobDefinition
    queue: batch.JobQueue
    array_size: int
    on_demand_queue: batch.JobQueue | None = None

    @property
    def name(self) -> str:
        return self.job.name

    @property
    def stage(self) -> Stage:
        return self.job.stage


def stage_images(scope: Construct, config: AtlasConfig) -> dict[str, ecs.ContainerImage]:
    """Container images of the stages, built from ``containers/<kind>/Dockerfile`` by the CLI at deploy.

    Synth only records the assets (no docker needed). The build context is the repository root,
    as the Dockerfiles expect, narrowed by the root ``.dockerignore`` (CDK applies it when staging
    and hashing); the segmentation weights are baked in at build time from the configured URL
    and checked against their sha256.
    """
    weights = {UNET_WEIGHTS_URL_ARG: config.segment_weights_url or "",
               UNET_WEIGHTS_SHA256_ARG: config.segment_weights_sha256 or ""}
    kinds = ("cpu", "gpu") if config.gpu else ("cpu",)
    return {kind: ecs.ContainerImage.from_docker_image_asset(ecr_assets.DockerImageAsset(
        scope, f"{kind.capitalize()}Image", directory=str(REPO_ROOT), file=f"containers/{kind}/Dockerfile",
        platform=ecr_assets.Platform.LINUX_AMD64, build_args=weights,
        display_name=f"atlas {kind} stage image"))
        for kind in kinds}


class BatchCompute(Construct):
    """VPC, compute environments, job queues and one job definition per stage job.

    Attributes
    ----------
    vpc : ec2.Vpc
        Private subnets with one NAT gateway; S3 traffic goes through a free gateway endpoint.
    cpu_queue : batch.JobQueue
    gpu_queue : batch.JobQueue or None
    on_demand_queues : dict of str to batch.JobQueue
        ``cpu``/``gpu`` on-demand-only queues (Spot on only): capacity-cancelled jobs go there.
    launch_template : ec2.LaunchTemplate
        Of every compute environment, which follow its latest version.
    job_role : iam.Role
        Role of the stage containers but publish (bucket access via :meth:`grant_buckets`).
    publish_role : iam.Role
        Role of the publish container: the only one that may write results and the overview site.
    jobs : dict of str to StageJob
        By job name, in registry order; an array stage is followed by its ``-merge`` job.
    """

    def __init__(self, scope: Construct, id: str, *, config: AtlasConfig, images: dict[str, ecs.ContainerImage],
                 environment: dict[str, str], flow_log_bucket: s3.IBucket) -> None:
        super().__init__(scope, id)
        self.vpc = ec2.Vpc(
            self, "Vpc", max_azs=3, nat_gateways=1,
            subnet_configuration=[
                ec2.SubnetConfiguration(name="Public", subnet_type=ec2.SubnetType.PUBLIC, cidr_mask=24),
                ec2.SubnetConfiguration(name="Jobs", subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS, cidr_mask=20)],
            gateway_endpoints={"S3": ec2.GatewayVpcEndpointOptions(service=ec2.GatewayVpcEndpointAwsService.S3)},
            flow_logs={"All": ec2.FlowLogOptions(
                destination=ec2.FlowLogDestination.to_s3(flow_log_bucket, "vpc-flow-logs/"))})
        self._security_group = ec2.SecurityGroup(
            self, "JobSecurityGroup", vpc=self.vpc, allow_all_outbound=True,
            description="Batch instances: no inbound; outbound to S3, ECR and AWS APIs")
        self._instance_role = iam.Role(
            self, "InstanceRole", assumed_by=iam.ServicePrincipal("ec2.amazonaws.com"),
            managed_policies=[iam.ManagedPolicy.from_aws_managed_policy_name(
                "service-role/AmazonEC2ContainerServiceforEC2Role")])
        acknowledge(self._instance_role, managed_policy_finding("service-role/AmazonEC2ContainerServiceforEC2Role"),
                    "The AWS-maintained policy the ECS agent on Batch instances needs; job permissions live in the "
                    "separate job role.")
        self.launch_template = ec2.LaunchTemplate(
            self, "InstanceTemplate", require_imdsv2=True, http_put_response_hop_limit=2,
            block_devices=[ec2.BlockDevice(device_name="/dev/xvda", volume=ec2.BlockDeviceVolume.ebs(
                config.scratch_volume_gib, volume_type=ec2.EbsDeviceVolumeType.GP3, encrypted=True))])

        self.on_demand_queues: dict[str, batch.JobQueue] = {}
        self.cpu_queue = self._queue("Cpu", config, config.cpu_instance_types, config.cpu_max_vcpus,
                                     batch.EcsMachineImageType.ECS_AL2023)
        self.gpu_queue = (self._queue("Gpu", config, config.gpu_instance_types, config.gpu_max_vcpus,
                                      batch.EcsMachineImageType.ECS_AL2023_NVIDIA) if config.gpu else None)

        self.job_role = iam.Role(self, "JobRole", assumed_by=iam.ServicePrincipal("ecs-tasks.amazonaws.com"),
                                 description="Stage containers but publish: read ingest, read/write work")
        self.publish_role = iam.Role(self, "PublishRole", assumed_by=iam.ServicePrincipal("ecs-tasks.amazonaws.com"),
                                     description="Publish container: read work, add results and overview pages")
        self.execution_role = iam.Role(
            self, "ExecutionRole", assumed_by=iam.ServicePrincipal("ecs-tasks.amazonaws.com"),
            description="ECS agent for stage jobs: pull the stage images, write job logs")
        acknowledge_wildcards(self.execution_role, "ecr:GetAuthorizationToken has no resource-level permissions; "
                              "image pulls themselves are limited to the stage images' repository.", resources=["*"])
        self.log_group = logs.LogGroup(self, "JobLogs", retention=config.log_retention)
        self.jobs: dict[str, StageJob] = {}
        for job in batch_jobs():
            on_gpu = job.stage.image == "gpu" and config.gpu and not job.merge
            image = images["gpu" if on_gpu else "cpu"]
            stage_job = StageJob(job=job, queue=self.gpu_queue if on_gpu else self.cpu_queue,
                                 on_demand_queue=self.on_demand_queues.get("gpu" if on_gpu else "cpu"),
                                 array_size=0 if job.item is None else job.count,
                                 definition=self._job_definition(job, gpu=on_gpu, image=image,
                                                                 environment=environment, config=config))
            self.jobs[stage_job.name] = stage_job

    def _queue(self, kind: str, config: AtlasConfig, instance_types: tuple[str, ...], max_vcpus: int,
               image_type: batch.EcsMachineImageType) -> batch.JobQueue:
        """A job queue over a Spot then an on-demand compute environment (on-demand only without Spot).

        With Spot, the on-demand environment also gets a queue of its own (``on_demand_queues``).
        """
        environments = {spot: self._compute_environment(kind, spot=spot, instance_types=instance_types,
                                                        max_vcpus=max_vcpus, image_type=image_type)
                        for spot in ((True, False) if config.spot else (False,))}
        if config.spot:
            self.on_demand_queues[kind.lower()] = self._job_queue(
                f"{kind}OnDemandQueue", config.name(f"{kind.lower()}-ondemand"), [environments[False]])
        return self._job_queue(f"{kind}Queue", config.name(kind.lower()), list(environments.values()))

    def _job_queue(self, id: str, name: str,
                   environments: list[batch.IManagedEc2EcsComputeEnvironment]) -> batch.JobQueue:
        return batch.JobQueue(
            self, id, job_queue_name=name, priority=1,
            compute_environments=[batch.OrderedComputeEnvironment(order=order, compute_environment=environment)
                                  for order, environment in enumerate(environments, start=1)],
            job_state_time_limit_actions=[
                batch.JobStateTimeLimitAction(reason=reason, max_time=max_time,
                                              action=batch.JobStateTimeLimitActionsAction.CANCEL,
                                              state=batch.JobStateTimeLimitActionsState.RUNNABLE)
                for reason, max_time in QUEUE_TIME_LIMITS.items()])

    def _compute_environment(self, kind: str, *, spot: bool, instance_types: tuple[str, ...], max_vcpus: int,
                             image_type: batch.EcsMachineImageType) -> batch.ManagedEc2EcsComputeEnvironment:
        environment = batch.ManagedEc2EcsComputeEnvironment(
            self, f"{kind}{'Spot' if spot else 'OnDemand'}", vpc=self.vpc,
            vpc_subnets=ec2.SubnetSelection(subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS),
            security_groups=[self._security_group], instance_role=self._instance_role,
            launch_template=self.launch_template,
            # families ("c6i") by CDK's instance class, sizes ("m6i.4xlarge") as instance types
            instance_types=[ec2.InstanceType(t) for t in instance_types if "." in t],
            instance_classes=[ec2.InstanceClass[t.upper()] for t in instance_types if "." not in t],
            use_optimal_instance_classes=False, images=[batch.EcsMachineImage(image_type=image_type)],
            minv_cpus=0, maxv_cpus=max_vcpus, spot=spot, update_to_latest_image_version=True,
            allocation_strategy=(batch.AllocationStrategy.SPOT_PRICE_CAPACITY_OPTIMIZED if spot
                                 else batch.AllocationStrategy.BEST_FIT_PROGRESSIVE))
        # Batch freezes the launch template version a compute environment uses when it is created;
        # naming the latest version makes a template change (scratch size, IMDS) a change of this
        # property, so CloudFormation updates the environment (an infrastructure update) on deploy.
        environment.node.default_child.add_property_override(
            "ComputeResources.LaunchTemplate.Version", self.launch_template.latest_version_number)
        return environment

    def _job_definition(self, job: Job, *, gpu: bool, image: ecs.ContainerImage,
                        environment: dict[str, str], config: AtlasConfig) -> batch.EcsJobDefinition:
        name, stage = job.name, job.stage
        container = batch.EcsEc2ContainerDefinition(
            self, f"{name}Container", image=image, cpu=stage.vcpus, memory=Size.mebibytes(stage.memory_mib),
            gpu=1 if gpu else None, command=stage_command(job), environment=environment,
            job_role=self.publish_role if stage.publishes else self.job_role,
            execution_role=self.execution_role,
            logging=ecs.LogDriver.aws_logs(stream_prefix=name, log_group=self.log_group))
        return batch.EcsJobDefinition(
            self, f"{name}Job", job_definition_name=config.name(name), container=container,
            timeout=Duration.seconds(stage.timeout_s), propagate_tags=True, retry_attempts=SPOT_ATTEMPTS,
            retry_strategies=[
                batch.RetryStrategy.of(batch.Action.RETRY, batch.Reason.SPOT_INSTANCE_RECLAIMED),
                batch.RetryStrategy.of(batch.Action.EXIT, batch.Reason.custom(on_reason="*")),
            ])

    def grant_buckets(self, *, ingest: s3.IBucket, work: s3.IBucket, publish: Sequence[s3.IBucket]) -> None:
        """Stage jobs read ``ingest`` and read/write ``work``; the publish job reads both and may only add
        objects (never delete) to the ``publish`` buckets (results, overview site), which it also reads
        (the portal at the site's root is rebuilt from the releases, atlas.aws.portal)."""
        for role in (self.job_role, self.publish_role):
            ingest.grant_read(role)
            work.grant_read_write(role)
        for bucket in publish:
            bucket.grant_put(self.publish_role)
            bucket.grant_read(self.publish_role)
        reason = ("Stage jobs work on any slide's and run's objects, so object ARNs end in /*; the actions are "
                  "CDK's grant_read / grant_read_write / grant_put sets, each on the named buckets only.")
        acknowledge_wildcards(self.job_role, reason, actions=(*S3_READ_ACTIONS, "s3:DeleteObject*", "s3:Abort*"),
                              resources=[b.arn_for_objects("*") for b in (ingest, work)])
        acknowledge_wildcards(self.publish_role, reason, actions=(*S3_READ_ACTIONS, "s3:DeleteObject*", "s3:Abort*"),
                              resources=[b.arn_for_objects("*") for b in (ingest, work, *publish)])
