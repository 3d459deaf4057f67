"""Deployment configuration: one typed, frozen, validated object read from CDK context.

``cdk.json`` holds named environments under the context key ``atlas:environments``; the key
``atlas:environment`` picks one (``cdk deploy -c atlas:environment=prod``). A pydantic model
checks the types (strict: a JSON number is not an account ID, "yes" is not true) and then the
values and their combinations; every problem of a section is reported at once as a
:class:`atlas.errors.Problem` (where, what is wrong with the bad value, the fix), and synth stops
before any construct is built. See docs/deploy.md for the reference of every key.
"""
from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_logs as logs
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from atlas.aws.release import RESULTS_REGION
from atlas.errors import Problem
from atlas.stages import STAGES
from infra.access import MAX_GRANTEES

ENVIRONMENT_KEY = "atlas:environment"
ENVIRONMENTS_KEY = "atlas:environments"

# Retentions CloudWatch Logs accepts, in days.
_R = logs.RetentionDays
LOG_RETENTION = {1: _R.ONE_DAY, 3: _R.THREE_DAYS, 5: _R.FIVE_DAYS, 7: _R.ONE_WEEK, 14: _R.TWO_WEEKS,
                 30: _R.ONE_MONTH, 60: _R.TWO_MONTHS, 90: _R.THREE_MONTHS, 120: _R.FOUR_MONTHS,
                 150: _R.FIVE_MONTHS, 180: _R.SIX_MONTHS, 365: _R.ONE_YEAR, 400: _R.THIRTEEN_MONTHS,
                 545: _R.EIGHTEEN_MONTHS, 731: _R.TWO_YEARS, 1096: _R.THREE_YEARS, 1827: _R.FIVE_YEARS,
                 2192: _R.SIX_YEARS, 2557: _R.SEVEN_YEARS, 2922: _R.EIGHT_YEARS, 3288: _R.NINE_YEARS,
                 3653: _R.TEN_YEARS}

_PREFIX_RE = re.compile(r"^[a-z][a-z0-9-]{0,18}[a-z0-9]$")
_REGION_RE = re.compile(r"^[a-z]{2}(-gov)?-[a-z]+-\d$")
_ACCOUNT_RE = re.compile(r"^\d{12}$")
_INSTANCE_RE = re.compile(r"^[a-z][a-z0-9-]*\d[a-z0-9-]*(\.[a-z0-9]+)?$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[a-z]{2,}$", re.IGNORECASE)
# GPU families the ECS AL2023 NVIDIA AMI supports: g/p families on x86, except p3 and g3
# (unsupported by that AMI) and Graviton ones (family ending in "g", e.g. g5g).
_GPU_FAMILY_RE = re.compile(r"^(g|p)\d+[a-z]*$")
_GPU_UNSUPPORTED = re.compile(r"^(g3|g3s|p3|p3dn)$|^g\d+g$")


class ConfigError(ValueError):
    """Invalid deployment configuration; carries every problem found (:class:`Problem`), each with its fix."""

    def __init__(self, where: str, problems: list[Problem]):
        self.problems = list(problems)
        super().__init__(f"invalid configuration {where}:\n" + "\n".join(f"  - {p}" for p in self.problems))


# Where the settings live, for Problem.file.
CONFIG_FILE = "cdk.json"


class AtlasConfig(BaseModel):
    """What ops set per environment; defaults are a small, safe deployment.

    Attributes
    ----------
    name_prefix : str
        Prefix of stack names and physical names (lowercase letters, digits, '-'; 2-20 chars).
    region : str
        Processing region: ingest, Batch, Step Functions, catalog.
    account : str or None
        Account to deploy to; None uses the CLI's current account.
    results_region : str
        Region of the results bucket; must be us-east-1 (checked).
    grantee_account_ids : tuple of str
        External AWS accounts allowed to list and read the results (they pay their requests);
        at most ``infra.access.MAX_GRANTEES`` (the bucket policy's 20 KB).
    cpu_instance_types, gpu_instance_types : tuple of str
        EC2 instance families or types (``c6i``, ``m6i.4xlarge``) of the Batch compute environments.
    cpu_max_vcpus, gpu_max_vcpus : int
        Upper bound of each compute environment (cost ceiling).
    spot : bool
        Run CPU/GPU jobs on Spot first; the on-demand environment takes over at the Spot ceiling,
        and a job cancelled for lack of Spot capacity is resubmitted to an on-demand-only queue.
    gpu : bool
        Create the GPU queue; otherwise GPU stages run on the CPU queue with the CPU image.
    notification_emails : tuple of str
        Addresses subscribed to run results and alarms.
    log_retention_days : int
        Retention of every log group (a CloudWatch Logs value).
    work_retention_days : int
        Days a run's staging files stay in the work bucket.
    noncurrent_version_days : int
        Days overwritten/deleted object versions stay in the versioned buckets.
    scratch_volume_gib : int
        Encrypted gp3 root volume of each Batch instance (image layers and stage scratch).
    monthly_budget_usd : int or None
        AWS Budgets monthly cost budget of the account (USD): the topic hears at 80 % spent and at
        100 % forecast; None: no budget.
    segment_weights_url, segment_weights_sha256 : str or None
        https URL and sha256 of the segmentation model (ONNX) baked into the images at deploy;
        None: the segment stage uses its classical engine.
    tags : Mapping[str, str]
        Tags on every resource (cost allocation).
    """

    model_config = ConfigDict(frozen=True, strict=True, extra="forbid")

    name_prefix: str = "atlas"
    region: str = RESULTS_REGION
    account: str | None = None
    results_region: str = RESULTS_REGION
    grantee_account_ids: tuple[str, ...] = ()
    cpu_instance_types: tuple[str, ...] = ("c6i", "m6i", "r6i")
    cpu_max_vcpus: int = 256
    spot: bool = True
    gpu: bool = False
    gpu_instance_types: tuple[str, ...] = ("g5", "g6")
    gpu_max_vcpus: int = 64
    notification_emails: tuple[str, ...] = ()
    log_retention_days: int = 90
    work_retention_days: int = 14
    noncurrent_version_days: int = 90
    scratch_volume_gib: int = 200
    monthly_budget_usd: int | None = None
    segment_weights_url: str | None = None
    segment_weights_sha256: str | None = None
    tags: Mapping[str, str] = Field(default_factory=lambda: MappingProxyType({}))

    @field_validator("grantee_account_ids", "cpu_instance_types", "gpu_instance_types", "notification_emails",
                     mode="before")
    @classmethod
    def _json_list(cls, value: Any) -> Any:
        """JSON has lists, not tuples: accept a list of strings (strict mode checks the items)."""
        return tuple(value) if isinstance(value, list) else value

    @field_validator("tags", mode="after")
    @classmethod
    def _frozen_tags(cls, value: Mapping[str, str]) -> Mapping[str, str]:
        return MappingProxyType(dict(value))

    @property
    def log_retention(self) -> logs.RetentionDays:
        """``log_retention_days`` as the CDK enum."""
        return LOG_RETENTION[self.log_retention_days]

    def name(self, suffix: str) -> str:
        """Physical name ``<prefix>-<suffix>``, the one naming rule of every stack and resource."""
        return f"{self.name_prefix}-{suffix}"

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], where: str = "") -> AtlasConfig:
        """Validate a config section and build the config.

        Raises
        ------
        ConfigError
            Listing every problem: unknown keys (with the closest known key), wrong types, bad
            values, and combinations that cannot deploy. Type problems stop the value checks.
        """
        file = f"{CONFIG_FILE} {where}".strip()
        if not isinstance(raw, Mapping):
            raise ConfigError(where, [Problem(file, f"expected an object of settings, got {type(raw).__name__}",
                                              "write the environment's settings as a JSON object")])
        try:
            config = cls.model_validate(dict(raw))
        except ValidationError as exc:
            raise ConfigError(where, [_type_problem(file, error, raw) for error in exc.errors()]) from None
        problems = [Problem(file, message, fix) for message, fix in config._problems()]
        if problems:
            raise ConfigError(where, problems)
        return config

    def _problems(self) -> list[tuple[str, str]]:
        """(what is wrong, the fix) of values and combinations; types are already right."""
        problems = []
        if not _PREFIX_RE.match(self.name_prefix):
            problems.append((f"name_prefix {self.name_prefix!r} must be 2-20 characters of lowercase letters, "
                             "digits and '-', starting with a letter (it is part of bucket names)",
                             "use e.g. 'atlas-prod'"))
        for key in ("region", "results_region"):
            if not _REGION_RE.match(getattr(self, key)):
                problems.append((f"{key} {getattr(self, key)!r} is not an AWS region name",
                                 "use a region such as 'eu-west-1'"))
        if self.results_region != RESULTS_REGION:
            problems.append((f"results_region {self.results_region!r} is not {RESULTS_REGION!r}: the requester-pays "
                             f"results bucket must be in {RESULTS_REGION}, where external analysts read it "
                             "without transfer charges",
                             f"set results_region to {RESULTS_REGION!r} (processing may stay in another region "
                             "via 'region')"))
        if self.account is not None and not _ACCOUNT_RE.match(self.account):
            problems.append((f"account {self.account!r} is not a 12-digit AWS account ID",
                             "write it as a quoted string of 12 digits, or remove it to use the CLI's account"))
        for i, account in enumerate(self.grantee_account_ids):
            if not _ACCOUNT_RE.match(account):
                problems.append((f"grantee_account_ids[{i}] {account!r} is not a 12-digit AWS account ID",
                                 "write each as a quoted string of 12 digits, e.g. \"111122223333\" (keep leading "
                                 "zeros)"))
        duplicates = sorted({a for a in self.grantee_account_ids if self.grantee_account_ids.count(a) > 1})
        if duplicates:
            problems.append((f"grantee_account_ids lists {', '.join(duplicates)} more than once",
                             "list each account once"))
        if len(self.grantee_account_ids) > MAX_GRANTEES:
            problems.append((f"grantee_account_ids lists {len(self.grantee_account_ids)} accounts; the results "
                             f"bucket policy holds at most {MAX_GRANTEES} (S3's 20 KB limit)",
                             "grant further accounts through S3 access points (docs/runbook.md, 'Grantees')"))
        problems += _instance_problems("cpu_instance_types", self.cpu_instance_types)
        if self.gpu:
            if self.gpu_instance_types:
                problems += _instance_problems("gpu_instance_types", self.gpu_instance_types)
            else:
                problems.append(("gpu is true but gpu_instance_types is empty",
                                 "list GPU families such as [\"g5\", \"g6\"], or set gpu to false (GPU stages then "
                                 "run on the CPU queue)"))
            for t in self.gpu_instance_types:
                family = t.split(".")[0]
                if not _GPU_FAMILY_RE.match(family) or _GPU_UNSUPPORTED.match(family):
                    problems.append((f"gpu_instance_types entry {t!r} is not an x86 NVIDIA GPU family supported by "
                                     "the ECS AL2023 NVIDIA AMI", "use families such as g4dn, g5, g6, g6e, p4d, p5"))
        # Every stage may run on the CPU queue (GPU off, array merges); only GPU stages on the GPU queue.
        needs = {"cpu_max_vcpus": max(s.vcpus for s in STAGES),
                 "gpu_max_vcpus": max((s.vcpus for s in STAGES if s.image == "gpu"), default=1) if self.gpu else 1}
        for key, need in needs.items():
            if getattr(self, key) < need:
                problems.append((f"{key} is {getattr(self, key)} but the stage registry has jobs of {need} vCPUs, "
                                 "which could never start", f"set {key} to at least {need}"))
        for i, email in enumerate(self.notification_emails):
            if not _EMAIL_RE.match(email):
                problems.append((f"notification_emails[{i}] {email!r} is not an e-mail address",
                                 "write addresses like ops@example.org"))
        if self.log_retention_days not in LOG_RETENTION:
            nearest = min(LOG_RETENTION, key=lambda d: abs(d - self.log_retention_days))
            problems.append((f"log_retention_days {self.log_retention_days} is not a CloudWatch Logs retention",
                             f"use one of {', '.join(map(str, LOG_RETENTION))} (nearest: {nearest})"))
        for key, low in (("work_retention_days", 1), ("noncurrent_version_days", 1), ("scratch_volume_gib", 30),
                         ("monthly_budget_usd", 1)):
            if getattr(self, key) is not None and getattr(self, key) < low:
                problems.append((f"{key} is {getattr(self, key)}; it must be at least {low}", f"set {key} to {low} "
                                 "or more"))
        if (self.segment_weights_url is None) != (self.segment_weights_sha256 is None):
            problems.append(("segment_weights_url and segment_weights_sha256 go together",
                             "give both (the image build checks the download against the sha256) or neither "
                             "(classical segmentation)"))
        if self.gpu and self.segment_weights_url is None:
            problems.append(("gpu is true but segment_weights_url is not set: the GPU image runs the segmentation "
                             "model and its build needs the weights",
                             "set segment_weights_url and segment_weights_sha256, or set gpu to false (classical "
                             "segmentation on the CPU queue)"))
        if self.segment_weights_url is not None and not self.segment_weights_url.startswith("https://"):
            problems.append((f"segment_weights_url {self.segment_weights_url!r} must be an https:// URL",
                             "for a private S3 object, use a pre-signed URL"))
        if self.segment_weights_sha256 is not None and not _SHA256_RE.match(self.segment_weights_sha256):
            problems.append((f"segment_weights_sha256 {self.segment_weights_sha256!r} is not 64 hex characters",
                             "copy the sha256 of the weights file (sha256sum)"))
        for k, v in self.tags.items():
            if k.lower().startswith("aws:") or not 1 <= len(k) <= 128 or len(v) > 256:
                problems.append((f"tag {k!r} is not a valid tag",
                                 "keys are 1-128 characters not starting with 'aws:', values at most 256"))
        return problems


# How a message names the JSON type of a field, by the words in the field's annotation (first match).
_EXPECTED = (("bool", "true or false"), ("int", "a whole number"), ("tuple", "a list of strings"),
             ("Mapping", "an object of string keys and string values"))


def _type_problem(file: str, error: dict, raw: Mapping[str, Any]) -> Problem:
    """A Problem for one pydantic error: an unknown key (with the closest known one) or a wrong type."""
    key = str(error["loc"][0])
    if error["type"] == "extra_forbidden":
        close = difflib.get_close_matches(key, AtlasConfig.model_fields, n=1)
        return Problem(file, f"unknown key {key!r}", f"did you mean {close[0]!r}?" if close
                       else f"use one of the known keys: {', '.join(AtlasConfig.model_fields)}")
    value = raw.get(key)
    if key == "grantee_account_ids" and isinstance(value, list):
        return Problem(file, f"{key} must list account IDs as quoted strings (a JSON number loses leading zeros), "
                       f"got {value!r}", "quote each account ID, e.g. \"044455556666\"")
    annotation = str(AtlasConfig.model_fields[key].annotation)
    expected = next((words for marker, words in _EXPECTED if marker in annotation), "a string")
    return Problem(file, f"{key} must be {expected}, got {value!r}", f"write {key} as {expected}")


def _instance_problems(key: str, types: tuple[str, ...]) -> list[tuple[str, str]]:
    problems = []
    if not types:
        problems.append((f"{key} is empty", "list EC2 instance families such as [\"c6i\", \"m6i\"]"))
    for t in types:
        if not _INSTANCE_RE.match(t):
            problems.append((f"{key} entry {t!r} is not an EC2 instance family or type",
                             "write a family or type such as 'c6i' or 'm6i.4xlarge'"))
        elif "." not in t and t.upper() not in ec2.InstanceClass.__members__:
            problems.append((f"{key} entry {t!r} is not an instance family this aws-cdk-lib knows",
                             "check the spelling, or name a size of it (e.g. 'c8gd.4xlarge'), or upgrade "
                             "aws-cdk-lib"))
    return problems


def load_config(context: Any, *, default_account: str | None = None) -> AtlasConfig:
    """The config of the environment named by context ``atlas:environment``.

    Parameters
    ----------
    context : callable
        ``node.try_get_context`` of the app (a function key -> value or None).
    default_account : str, optional
        Account to use when the section sets none (the CLI's ``CDK_DEFAULT_ACCOUNT``).
    """
    name = context(ENVIRONMENT_KEY)
    environments = context(ENVIRONMENTS_KEY)
    if not isinstance(environments, Mapping) or not environments:
        raise ConfigError(f"(context {ENVIRONMENTS_KEY!r})",
                          [Problem(CONFIG_FILE, "no environments defined",
                                   f"add an object {ENVIRONMENTS_KEY!r} of named settings to the context in cdk.json "
                                   "(see docs/deploy.md)")])
    if name not in environments:
        raise ConfigError(f"(context {ENVIRONMENT_KEY!r})",
                          [Problem(CONFIG_FILE, f"environment {name!r} is not defined",
                                   f"choose one of {', '.join(map(repr, environments))} with -c "
                                   f"{ENVIRONMENT_KEY}=NAME, or add it under {ENVIRONMENTS_KEY!r} in cdk.json")])
    config = AtlasConfig.from_dict(environments[name], where=f"of environment {name!r} (context {ENVIRONMENTS_KEY!r})")
    if config.account is None and default_account:
        config = config.model_copy(update={"account": default_account})
    return config
