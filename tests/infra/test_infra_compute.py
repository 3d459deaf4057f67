"""Batch: Spot first with on-demand fallback, GPU queue behind config, one job definition per registry job."""
from __future__ import annotations

import json

import pytest
from cdk_templates import actions_of, logical_id, one, policy_statements, resources

from atlas.stages import batch_jobs
from infra.compute import QUEUE_TIME_LIMITS

JOBS = [(job.stage, job.merge) for job in batch_jobs()]
IDS = [job.name for job in batch_jobs()]


def environments(synth, queue: str) -> list[dict]:
    """Compute environments of a queue, in the queue's order."""
    _, job_queue = one(synth.pipeline, "AWS::Batch::JobQueue", f"Batch{queue}Queue")
    order = sorted(job_queue["Properties"]["ComputeEnvironmentOrder"], key=lambda o: o["Order"])
    all_ces = resources(synth.pipeline, "AWS::Batch::ComputeEnvironment")
    return [all_ces[o["ComputeEnvironment"]["Fn::GetAtt"][0]]["Properties"]["ComputeResources"] for o in order]


def test_cpu_queue_tries_spot_then_on_demand(full):
    spot, on_demand = environments(full, "Cpu")
    assert (spot["Type"], spot["AllocationStrategy"]) == ("SPOT", "SPOT_PRICE_CAPACITY_OPTIMIZED")
    assert on_demand["Type"] == "EC2"
    for ce in (spot, on_demand):
        assert ce["InstanceTypes"] == ["m6i.4xlarge", "c6i"]  # sizes as given, families by CDK's names
        assert (ce["MinvCpus"], ce["MaxvCpus"]) == (0, 128)
        assert ce["Ec2Configuration"] == [{"ImageType": "ECS_AL2023"}]
        assert ce["Subnets"] and all("Jobs" in s["Ref"] for s in ce["Subnets"])  # private subnets


def test_gpu_queue_uses_the_nvidia_ami_and_gpu_families(full):
    spot, on_demand = environments(full, "Gpu")
    assert [spot["Type"], on_demand["Type"]] == ["SPOT", "EC2"]
    for ce in (spot, on_demand):
        assert ce["Ec2Configuration"] == [{"ImageType": "ECS_AL2023_NVIDIA"}]
        assert ce["InstanceTypes"] == ["g5", "g6"] and ce["MaxvCpus"] == 32


def test_spot_off_and_gpu_off(lean):
    (on_demand,) = environments(lean, "Cpu")
    assert on_demand["Type"] == "EC2"
    assert not resources(lean.pipeline, "AWS::Batch::JobQueue", "BatchGpu")
    assert len(resources(lean.pipeline, "AWS::Batch::ComputeEnvironment")) == 1
    assert not resources(lean.pipeline, "AWS::Batch::JobQueue", "BatchCpuOnDemandQueue")  # nothing to fall back to


def test_each_spot_queue_has_an_on_demand_only_queue_over_the_same_environment(full):
    for kind in ("Cpu", "Gpu"):
        (on_demand_only,) = environments(full, f"{kind}OnDemand")
        assert on_demand_only == environments(full, kind)[1] and on_demand_only["Type"] == "EC2"
        _, queue = one(full.pipeline, "AWS::Batch::JobQueue", f"Batch{kind}OnDemandQueue")
        assert queue["Properties"]["JobQueueName"] == full.config.name(f"{kind.lower()}-ondemand")


def test_compute_environments_follow_the_launch_template_latest_version(synth):
    """Batch freezes the template version at creation: naming the latest version makes a template
    change a change of every environment, which CloudFormation applies as an update."""
    template_id, _ = one(synth.pipeline, "AWS::EC2::LaunchTemplate", "BatchInstanceTemplate")
    for ce in resources(synth.pipeline, "AWS::Batch::ComputeEnvironment").values():
        assert ce["Properties"]["ComputeResources"]["LaunchTemplate"] == {
            "LaunchTemplateId": {"Ref": template_id}, "Version": {"Fn::GetAtt": [template_id, "LatestVersionNumber"]}}
        assert ce["Properties"]["ReplaceComputeEnvironment"] is False  # updated in place, jobs keep running


def test_queues_cancel_jobs_stuck_runnable(synth):
    expected = sorted((f"{'CAPACITY' if 'CAPACITY' in r.value else 'MISCONFIGURATION'}:{r.value}",
                       int(d.to_seconds())) for r, d in QUEUE_TIME_LIMITS.items())
    for queue in resources(synth.pipeline, "AWS::Batch::JobQueue").values():
        actions = queue["Properties"]["JobStateTimeLimitActions"]
        assert sorted((a["Reason"], a["MaxTimeSeconds"]) for a in actions) == expected
        assert {(a["Action"], a["State"]) for a in actions} == {("CANCEL", "RUNNABLE")}


def definition(synth, stage, merge=False) -> dict:
    name = f"{stage.name}-merge" if merge else stage.name
    _, job = one(synth.pipeline, "AWS::Batch::JobDefinition", f"Batch{name.replace('-', '')}Job")
    return job["Properties"]


@pytest.mark.parametrize("stage, merge", JOBS, ids=IDS)
def test_job_definition_follows_the_registry(synth, stage, merge):
    props = definition(synth, stage, merge)
    container = props["ContainerProperties"]
    requirements = {r["Type"]: r["Value"] for r in container["ResourceRequirements"]}
    assert requirements["VCPU"] == str(stage.vcpus) and requirements["MEMORY"] == str(stage.memory_mib)
    assert props["Timeout"] == {"AttemptDurationSeconds": stage.timeout_s}
    assert props["JobDefinitionName"] == synth.config.name(f"{stage.name}-merge" if merge else stage.name)
    assert container["Command"] == ["stage", stage.name, "--slide-uri", "Ref::slide_uri", "--work-uri",
                                    "Ref::work_uri", "--run-id", "Ref::run_id", *(["--merge"] if merge else []),
                                    *(["--items", "Ref::items"] if stage.array_size else []),
                                    "--vcpus", "Ref::vcpus"]  # this run's vCPUs (the definition's are defaults)
    assert props["PropagateTags"] is True
    compute = synth.pipeline_stack.compute
    role = compute.publish_role if stage.publishes else compute.job_role
    assert container["JobRoleArn"] == {"Fn::GetAtt": [logical_id(role), "Arn"]}


@pytest.mark.parametrize("stage, merge", JOBS, ids=IDS)
def test_jobs_retry_only_when_spot_reclaims_the_instance(synth, stage, merge):
    strategy = definition(synth, stage, merge)["RetryStrategy"]
    assert strategy["Attempts"] == 3
    # first match wins: a reclaim is retried, anything else exits
    assert strategy["EvaluateOnExit"] == [{"Action": "RETRY", "OnStatusReason": "Host EC2*"},
                                          {"Action": "EXIT", "OnReason": "*"}]


def image_kinds(synth) -> dict[str, str]:
    """Docker image asset hash -> image kind ("cpu"/"gpu"), from the stack's asset manifest."""
    manifest = json.loads((synth.outdir / f"{synth.pipeline_stack.artifact_id}.assets.json").read_text())
    return {digest: asset["source"]["dockerFile"].split("/")[1] for digest, asset in manifest["dockerImages"].items()}


def test_gpu_stages_get_a_gpu_and_the_gpu_image_only_when_gpu_is_on(full, lean):
    for synth in (full, lean):
        kinds = image_kinds(synth)
        for stage, merge in JOBS:
            container = definition(synth, stage, merge)["ContainerProperties"]
            gpus = [r for r in container["ResourceRequirements"] if r["Type"] == "GPU"]
            on_gpu = stage.image == "gpu" and synth.config.gpu and not merge  # merging needs no GPU
            assert gpus == ([{"Type": "GPU", "Value": "1"}] if on_gpu else []), stage.name
            (kind,) = [k for digest, k in kinds.items() if digest in json.dumps(container["Image"])]
            assert kind == ("gpu" if on_gpu else "cpu"), stage.name


def test_stage_images_are_docker_assets_of_the_containers_dockerfiles(full, lean):
    for synth, kinds in ((full, {"cpu", "gpu"}), (lean, {"cpu"})):
        manifest = json.loads((synth.outdir / f"{synth.pipeline_stack.artifact_id}.assets.json").read_text())
        sources = [a["source"] for a in manifest["dockerImages"].values()]
        assert {s["dockerFile"] for s in sources} == {f"containers/{k}/Dockerfile" for k in kinds}
        for source in sources:
            assert source["platform"] == "linux/amd64"
            if synth is full:
                assert source["dockerBuildArgs"] == {"UNET_WEIGHTS_URI": "https://models.example.org/unet.onnx",
                                                     "UNET_WEIGHTS_SHA256": "ab" * 32}


def test_dockerfiles_take_the_weights_build_args():
    from infra.compute import REPO_ROOT, UNET_WEIGHTS_SHA256_ARG, UNET_WEIGHTS_URL_ARG

    for kind in ("cpu", "gpu"):
        text = (REPO_ROOT / "containers" / kind / "Dockerfile").read_text()
        assert f"ARG {UNET_WEIGHTS_URL_ARG}" in text and f"ARG {UNET_WEIGHTS_SHA256_ARG}" in text
        assert 'ENTRYPOINT ["tini", "--", "atlas"]' in text  # job commands are `atlas` arguments


def test_instances_require_imdsv2_and_encrypted_scratch(full):
    _, template = one(full.pipeline, "AWS::EC2::LaunchTemplate", "BatchInstanceTemplate")
    data = template["Properties"]["LaunchTemplateData"]
    assert data["MetadataOptions"]["HttpTokens"] == "required"
    assert data["MetadataOptions"]["HttpPutResponseHopLimit"] == 2  # containers reach IMDS (instance type)
    (device,) = data["BlockDeviceMappings"]
    assert device["Ebs"] == {"Encrypted": True, "VolumeSize": 300, "VolumeType": "gp3"}


def test_jobs_run_in_private_subnets_with_an_s3_gateway_endpoint_and_flow_logs(full):
    _, group = one(full.pipeline, "AWS::EC2::SecurityGroup", "BatchJobSecurityGroup")
    assert "SecurityGroupIngress" not in group["Properties"]
    (endpoint,) = resources(full.pipeline, "AWS::EC2::VPCEndpoint").values()
    assert endpoint["Properties"]["VpcEndpointType"] == "Gateway"
    (flow_log,) = resources(full.pipeline, "AWS::EC2::FlowLog").values()
    assert flow_log["Properties"]["LogDestinationType"] == "s3" and flow_log["Properties"]["TrafficType"] == "ALL"


def role_grants(synth, role) -> dict[str, set[str]]:
    """Resource (as JSON text) -> actions ``role`` has on it."""
    grants: dict[str, set[str]] = {}
    for statement in policy_statements(synth.pipeline, f"{logical_id(role)[:-8]}DefaultPolicy"):
        for resource in statement["Resource"] if isinstance(statement["Resource"], list) else [statement["Resource"]]:
            grants.setdefault(json.dumps(resource), set()).update(actions_of(statement))
    return grants


def bucket_objects(synth) -> dict[str, str]:
    stack = synth.pipeline_stack
    objects = {name: json.dumps({"Fn::Join": ["", [{"Fn::GetAtt": [logical_id(bucket), "Arn"]}, "/*"]]})
               for name, bucket in (("ingest", stack.storage.ingest), ("work", stack.storage.work),
                                    ("overview", stack.site.bucket))}
    objects["results"] = json.dumps("arn:aws:s3:::atlas-test-results-123456789012/*")
    return objects


def test_jobs_read_raw_data_and_only_publish_adds_results(full):
    objects = bucket_objects(full)
    compute = full.pipeline_stack.compute
    for role in (compute.job_role, compute.publish_role):
        grants = role_grants(full, role)
        assert not any(a.startswith(("s3:Put", "s3:Delete")) for a in grants[objects["ingest"]])
        assert "s3:PutObject" in grants[objects["work"]] and "s3:DeleteObject*" in grants[objects["work"]]
    stages, publish = role_grants(full, compute.job_role), role_grants(full, compute.publish_role)
    for name in ("results", "overview"):
        assert name not in {k for k, v in objects.items() if v in stages}, f"stage jobs may write {name}"
        assert "s3:PutObject" in publish[objects[name]], name
        assert not any(a.startswith("s3:Delete") for a in publish[objects[name]]), name
