"""Deployment configuration: one typed, frozen, validated object read from CDK context.

``cdk.json`` holds named environments under the context key ``atlas:environments``; the key
``atlas:environment`` picks one (``cdk deploy -c atlas:environment=prod``). Every problem of a
section is reported at once, each naming the key, the bad value and the fix, and synth stops
before any construct is built. See docs/deploy.md for the reference of every key.
"""
from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from types import MappingProxyType
from typing import Any

from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_logs as logs

from atlas.aws.release import RESULTS_REGION
from atlas.stages import STAGES

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
    """Invalid deployment configuration; carries every problem found, each with its fix."""

    def __init__(self, where: str, problems: list[str]):
        self.problems = list(problems)
        super().__init__(f"invalid configuration {where}:\n" + "\n".join(f"  - {p}" for p in self.problems))


@dataclass(frozen=True)
class AtlasConfig:
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
        External AWS accounts allowed to list and read the results (they pay their requests).
    cpu_instance_types, gpu_instance_types : tuple of str
        EC2 instance families or types (``c6i``, ``m6i.4xlarge``) of the Batch compute environments.
    cpu_max_vcpus, gpu_max_vcpus : int
        Upper bound of each compute environment (cost ceiling).
    spot : bool
        Run CPU/GPU jobs on Spot first, with an on-demand environment as fallback.
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
    segment_weights_url, segment_weights_sha256 : str or None
        https URL and sha256 of the segmentation model (ONNX) baked into the images at deploy;
        None: the segment stage uses its classical engine.
    tags : Mapping[str, str]
        Tags on every resource (cost allocation).
    """

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
    segment_weights_url: str | None = None
    segment_weights_sha256: str | None = None
    tags: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

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
            values, and combinations that cannot deploy.
        """
        if not isinstance(raw, Mapping):
            raise ConfigError(where, [f"expected an object of settings, got {type(raw).__name__}"])
        known = {f.name: f for f in fields(cls)}
        problems: list[str] = []
        for key in raw:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(known)}"
                problems.append(f"unknown key {key!r}: {hint}")
        values: dict[str, Any] = {}
        for key, f in known.items():
            if key not in raw:
                continue
            default = f.default_factory() if f.default is MISSING else f.default
            value, problem = _coerce(key, raw[key], default)
            if problem:
                problems.append(problem)
            else:
                values[key] = value
        config = cls(**values) if not problems else None
        if config is not None:
            problems.extend(config._problems())
        if problems:
            raise ConfigError(where, problems)
        return config

    def _problems(self) -> list[str]:
        """Checks of values and combinations (types are already right)."""
        problems = []
        if not _PREFIX_RE.match(self.name_prefix):
            problems.append(f"name_prefix {self.name_prefix!r} must be 2-20 characters of lowercase letters, "
                            "digits and '-', starting with a letter (it is part of bucket names), e.g. 'atlas-prod'")
        for key in ("region", "results_region"):
            if not _REGION_RE.match(getattr(self, key)):
                problems.append(f"{key} {getattr(self, key)!r} is not an AWS region name such as 'eu-west-1'")
        if self.results_region != RESULTS_REGION:
            problems.append(f"results_region {self.results_region!r} is not {RESULTS_REGION!r}: the requester-pays "
                            f"results bucket must be in {RESULTS_REGION}, where external analysts read it "
                            f"without transfer charges; set results_region to {RESULTS_REGION!r} (processing "
                            "may stay in another region via 'region')")
        if self.account is not None and not _ACCOUNT_RE.match(self.account):
            problems.append(f"account {self.account!r} is not a 12-digit AWS account ID; write it as a quoted "
                            "string of 12 digits, or remove it to use the CLI's account")
        for i, account in enumerate(self.grantee_account_ids):
            if not _ACCOUNT_RE.match(account):
                problems.append(f"grantee_account_ids[{i}] {account!r} is not a 12-digit AWS account ID; write "
                                "each as a quoted string of 12 digits, e.g. \"111122223333\" (keep leading zeros)")
        duplicates = sorted({a for a in self.grantee_account_ids if self.grantee_account_ids.count(a) > 1})
        if duplicates:
            problems.append(f"grantee_account_ids lists {', '.join(duplicates)} more than once; list each account once")
        problems += _instance_problems("cpu_instance_types", self.cpu_instance_types)
        if self.gpu:
            if self.gpu_instance_types:
                problems += _instance_problems("gpu_instance_types", self.gpu_instance_types)
            else:
                problems.append("gpu is true but gpu_instance_types is empty: list GPU families such as "
                                "[\"g5\", \"g6\"], or set gpu to false (GPU stages then run on the CPU queue)")
            for t in self.gpu_instance_types:
                family = t.split(".")[0]
                if not _GPU_FAMILY_RE.match(family) or _GPU_UNSUPPORTED.match(family):
                    problems.append(f"gpu_instance_types entry {t!r} is not an x86 NVIDIA GPU family supported by "
                                    "the ECS AL2023 NVIDIA AMI; use families such as g4dn, g5, g6, g6e, p4d, p5")
        # Every stage may run on the CPU queue (GPU off, array merges); only GPU stages on the GPU queue.
        needs = {"cpu_max_vcpus": max(s.vcpus for s in STAGES),
                 "gpu_max_vcpus": max((s.vcpus for s in STAGES if s.image == "gpu"), default=1) if self.gpu else 1}
        for key, need in needs.items():
            if getattr(self, key) < need:
                problems.append(f"{key} is {getattr(self, key)} but the stage registry has jobs of {need} vCPUs, "
                                f"which could never start; set {key} to at least {need}")
        for i, email in enumerate(self.notification_emails):
            if not _EMAIL_RE.match(email):
                problems.append(f"notification_emails[{i}] {email!r} is not an e-mail address")
        if self.log_retention_days not in LOG_RETENTION:
            nearest = min(LOG_RETENTION, key=lambda d: abs(d - self.log_retention_days))
            problems.append(f"log_retention_days {self.log_retention_days} is not a CloudWatch Logs retention; "
                            f"use one of {', '.join(map(str, LOG_RETENTION))} (nearest: {nearest})")
        for key, low in (("work_retention_days", 1), ("noncurrent_version_days", 1), ("scratch_volume_gib", 30)):
            if getattr(self, key) < low:
                problems.append(f"{key} is {getattr(self, key)}; it must be at least {low}")
        if (self.segment_weights_url is None) != (self.segment_weights_sha256 is None):
            problems.append("segment_weights_url and segment_weights_sha256 go together: give both (the image "
                            "build checks the download against the sha256) or neither (classical segmentation)")
        if self.gpu and self.segment_weights_url is None:
            problems.append("gpu is true but segment_weights_url is not set: the GPU image runs the segmentation "
                            "model and its build needs the weights; set segment_weights_url and "
                            "segment_weights_sha256, or set gpu to false (classical segmentation on the CPU queue)")
        if self.segment_weights_url is not None and not self.segment_weights_url.startswith("https://"):
            problems.append(f"segment_weights_url {self.segment_weights_url!r} must be an https:// URL (for a "
                            "private S3 object, a pre-signed URL)")
        if self.segment_weights_sha256 is not None and not _SHA256_RE.match(self.segment_weights_sha256):
            problems.append(f"segment_weights_sha256 {self.segment_weights_sha256!r} is not 64 hex characters")
        for k, v in self.tags.items():
            if k.lower().startswith("aws:") or not 1 <= len(k) <= 128 or len(v) > 256:
                problems.append(f"tag {k!r}: keys are 1-128 characters not starting with 'aws:', values at most 256")
        return problems


def _coerce(key: str, value: Any, default: Any) -> tuple[Any, str | None]:
    """The value in the field's type, or a problem naming the expected JSON type."""
    if isinstance(default, bool):
        return (value, None) if isinstance(value, bool) else (None, f"{key} must be true or false, got {value!r}")
    if isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value, None
        return None, f"{key} must be a whole number, got {value!r}"
    if isinstance(default, tuple):
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value), None
        if isinstance(value, list) and key == "grantee_account_ids":
            return None, (f"{key} must list account IDs as quoted strings (a JSON number loses leading zeros), "
                          f"got {value!r}")
        return None, f"{key} must be a list of strings, got {value!r}"
    if isinstance(default, Mapping):
        if isinstance(value, Mapping) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            return MappingProxyType(dict(value)), None
        return None, f"{key} must be an object of string keys and string values, got {value!r}"
    if key in _OPTIONAL_STRINGS and value is None:
        return None, None
    return (value, None) if isinstance(value, str) else (None, f"{key} must be a string, got {value!r}")


_OPTIONAL_STRINGS = ("account", "segment_weights_url", "segment_weights_sha256")


def _instance_problems(key: str, types: tuple[str, ...]) -> list[str]:
    problems = []
    if not types:
        problems.append(f"{key} is empty; list EC2 instance families such as [\"c6i\", \"m6i\"]")
    for t in types:
        if not _INSTANCE_RE.match(t):
            problems.append(f"{key} entry {t!r} is not an EC2 instance family or type such as 'c6i' or 'm6i.4xlarge'")
        elif "." not in t and t.upper() not in ec2.InstanceClass.__members__:
            problems.append(f"{key} entry {t!r} is not an instance family this aws-cdk-lib knows; check the "
                            "spelling, or name a size of it (e.g. 'c8gd.4xlarge'), or upgrade aws-cdk-lib")
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
                          [f"no environments defined: add an object {ENVIRONMENTS_KEY!r} of named settings to the "
                           "context in cdk.json (see docs/deploy.md)"])
    if name not in environments:
        raise ConfigError(f"(context {ENVIRONMENT_KEY!r})",
                          [f"environment {name!r} is not defined; choose one of {', '.join(map(repr, environments))} "
                           f"with -c {ENVIRONMENT_KEY}=NAME, or add it under {ENVIRONMENTS_KEY!r} in cdk.json"])
    config = AtlasConfig.from_dict(environments[name], where=f"of environment {name!r} (context {ENVIRONMENTS_KEY!r})")
    if config.account is None and default_account:
        config = replace(config, account=default_account)
    return config
