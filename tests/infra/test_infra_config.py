"""Configuration: every bad setting stops synth with a message naming the key and the fix."""
from __future__ import annotations

import re

import pytest
from cdk_templates import CDK_CONTEXT, FULL

from atlas.errors import Problem
from infra.access import MAX_GRANTEES
from infra.config import ENVIRONMENT_KEY, ENVIRONMENTS_KEY, AtlasConfig, ConfigError, load_config


def problems_of(**settings) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        AtlasConfig.from_dict({**FULL, **settings}, where="of environment 'test'")
    assert all(isinstance(p, Problem) and p.file.startswith("cdk.json") and p.fix for p in caught.value.problems)
    return [str(p) for p in caught.value.problems]


def test_cdk_json_environments_are_valid():
    for name, settings in CDK_CONTEXT[ENVIRONMENTS_KEY].items():
        assert AtlasConfig.from_dict(settings).name_prefix, name
    assert CDK_CONTEXT[ENVIRONMENT_KEY] in CDK_CONTEXT[ENVIRONMENTS_KEY]


def test_full_settings_are_read_typed():
    config = AtlasConfig.from_dict(FULL)
    assert config.grantee_account_ids == ("111122223333", "044455556666")
    assert config.gpu and config.spot and config.region == "eu-west-1"
    assert dict(config.tags) == FULL["tags"]
    assert config.name("pipeline") == "atlas-test-pipeline"


@pytest.mark.parametrize("settings, message", [
    ({"grantee_account_ids": ["11112222333"]},
     r"grantee_account_ids\[0\] '11112222333' is not a 12-digit AWS account ID"),
    ({"grantee_account_ids": ["1111-2222-3333"]}, r"12-digit AWS account ID"),
    ({"grantee_account_ids": [111122223333]}, r"quoted strings \(a JSON number loses leading zeros\)"),
    ({"grantee_account_ids": ["111122223333", "111122223333"]}, r"lists 111122223333 more than once"),
    ({"account": "12345"}, r"account '12345' is not a 12-digit AWS account ID"),
    ({"gpu": True, "gpu_instance_types": []}, r"gpu is true but gpu_instance_types is empty.*set gpu to false"),
    ({"gpu": True, "gpu_instance_types": ["c6i"]}, r"'c6i' is not an x86 NVIDIA GPU family"),
    ({"gpu": True, "gpu_instance_types": ["p3"]}, r"'p3' is not an x86 NVIDIA GPU family supported by the ECS AL2023"),
    ({"gpu": True, "gpu_instance_types": ["g5g"]}, r"'g5g' is not an x86 NVIDIA GPU family"),
    ({"results_region": "eu-west-1"}, r"results_region 'eu-west-1' is not 'us-east-1'.*set results_region to"),
    ({"region": "europe"}, r"region 'europe' is not an AWS region name"),
    ({"name_prefix": "Atlas_Prod"}, r"name_prefix 'Atlas_Prod' must be 2-20 characters"),
    ({"cpu_instance_types": []}, r"cpu_instance_types is empty"),
    ({"cpu_instance_types": ["c6i", "C6I.large"]}, r"'C6I.large' is not an EC2 instance family or type"),
    ({"cpu_instance_types": ["zz9"]}, r"'zz9' is not an instance family this aws-cdk-lib knows"),
    ({"cpu_max_vcpus": 2}, r"cpu_max_vcpus is 2 but the stage registry has jobs of 4 vCPUs"),
    ({"notification_emails": ["ops.example.org"]}, r"notification_emails\[0\] 'ops.example.org' is not an e-mail"),
    ({"log_retention_days": 100}, r"log_retention_days 100 is not a CloudWatch Logs retention.*nearest: 90"),
    ({"scratch_volume_gib": 8}, r"scratch_volume_gib is 8; it must be at least 30"),
    ({"spot": "yes"}, r"spot must be true or false, got 'yes'"),
    ({"cpu_max_vcpus": "64"}, r"cpu_max_vcpus must be a whole number"),
    ({"tags": {"aws:owner": "x"}}, r"tag 'aws:owner'"),
    ({"segment_weights_sha256": None}, r"segment_weights_url and segment_weights_sha256 go together"),
    ({"segment_weights_url": None, "segment_weights_sha256": None},
     r"gpu is true but segment_weights_url is not set.*or set gpu to false"),
    ({"segment_weights_url": "s3://bucket/unet.onnx"}, r"must be an https:// URL"),
    ({"grante_account_ids": []}, r"unknown key 'grante_account_ids' -- fix: did you mean 'grantee_account_ids'\?"),
    ({"grantee_account_ids": [f"{i:012d}" for i in range(MAX_GRANTEES + 1)]},
     rf"lists {MAX_GRANTEES + 1} accounts; the results bucket policy holds at most {MAX_GRANTEES}.*access points"),
    ({"monthly_budget_usd": 0}, r"monthly_budget_usd is 0; it must be at least 1"),
    ({"monthly_budget_usd": 99.5}, r"monthly_budget_usd must be a whole number"),
])
def test_bad_setting_is_named_with_its_fix(settings, message):
    problems = problems_of(**settings)
    assert any(re.search(message, p) for p in problems), problems


def test_every_problem_is_reported_at_once():
    problems = problems_of(account="1", results_region="eu-central-1", gpu_instance_types=[], spot=1)
    assert len(problems) == 1  # a type error stops the value checks ...
    problems = problems_of(account="1", results_region="eu-central-1", gpu_instance_types=[])
    assert len(problems) == 3  # ... otherwise every value problem is listed
    assert "account '1'" in problems[1] and "results_region" in problems[0] and "gpu_instance_types" in problems[2]


def test_unknown_environment_lists_the_defined_ones():
    context = {ENVIRONMENT_KEY: "prod", ENVIRONMENTS_KEY: {"dev": {}, "staging": {}}}
    with pytest.raises(ConfigError, match=r"environment 'prod' is not defined -- fix: choose one of 'dev', 'staging'"):
        load_config(context.get)


def test_missing_environments_say_where_to_add_them():
    with pytest.raises(ConfigError, match=r"no environments defined -- fix: add an object 'atlas:environments'"):
        load_config({ENVIRONMENT_KEY: "dev"}.get)


def test_cli_account_fills_in_only_when_unset():
    context = {ENVIRONMENT_KEY: "a", ENVIRONMENTS_KEY: {"a": {}, "b": {"account": "210987654321"}}}
    assert load_config(context.get, default_account="123456789012").account == "123456789012"
    context[ENVIRONMENT_KEY] = "b"
    assert load_config(context.get, default_account="123456789012").account == "210987654321"
