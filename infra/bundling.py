"""Lambda code asset: the handlers, the ``atlas`` library and its light dependencies.

At deploy (``cdk synth``/``deploy`` outside tests) pip installs manylinux wheels for the Lambda
runtime and architecture into the asset, straight from this machine: no docker needed. Where
pip cannot (no Python here, no index), CDK falls back to the same install in the Lambda
runtime's build image with docker. Tests skip bundling (context ``aws:cdk:bundling-stacks=[]``).

The packages are the ones the handlers import (see ``LAMBDA_PACKAGES``), with pyproject.toml's
extras and ranges, pinned by ``containers/constraints.txt`` (the versions the tests ran with, as
in the Batch images), on the Python the project is tested on.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import jsii
from aws_cdk import AssetHashType, BundlingOptions, ILocalBundling
from aws_cdk import aws_lambda as lambda_

REPO_ROOT = Path(__file__).resolve().parents[1]
# What the Lambda asset holds besides the installed packages.
SOURCES = ("atlas", "functions")
CONSTRAINTS = "containers/constraints.txt"
# The distributions the handlers import (powertools: parser -> pydantic, tracer -> X-Ray SDK;
# atlas.aws.catalog -> ometiff -> numpy, tifffile; params -> pyyaml). boto3 comes with the runtime.
LAMBDA_PACKAGES = ("aws-lambda-powertools", "numpy", "tifffile", "pyyaml")

# The newest runtime within pyproject's requires-python (< 3.14). It runs on Amazon Linux 2023
# (glibc 2.34), which the pinned wheels need: numpy 2.4 ships manylinux_2_28 wheels only, so the
# python3.11 runtime (Amazon Linux 2, glibc 2.26) could not load them.
RUNTIME = lambda_.Runtime.PYTHON_3_13
ARCHITECTURE = lambda_.Architecture.ARM_64
# Wheel platforms the runtime's glibc (2.34) loads; pip does not widen a --platform tag to older
# manylinux levels by itself, so both levels that packages publish are named.
_PIP_PLATFORMS = {"arm64": ("manylinux_2_28_aarch64", "manylinux2014_aarch64"),
                  "x86_64": ("manylinux_2_28_x86_64", "manylinux2014_x86_64")}


def lambda_requirements(pyproject: Path = REPO_ROOT / "pyproject.toml") -> list[str]:
    """The pyproject.toml requirement of each of ``LAMBDA_PACKAGES`` (with its version range and extras)."""
    dependencies = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    by_name = {_normalize(re.split(r"[\[<>=!~; ]", d, maxsplit=1)[0]): d for d in dependencies}
    missing = [p for p in LAMBDA_PACKAGES if _normalize(p) not in by_name]
    if missing:
        raise ValueError(f"{', '.join(missing)} not in [project].dependencies of {pyproject}; the Lambda "
                         "asset installs the handlers' packages with the versions pinned there")
    return [by_name[_normalize(p)] for p in LAMBDA_PACKAGES]


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pip_arguments(requirements: list[str], *, source: str, target: str) -> list[str]:
    """``pip install`` arguments: wheels for the Lambda runtime and architecture, into ``target``.

    ``source`` is the repository root as the installing process sees it (for the constraints file).
    """
    version = RUNTIME.name.removeprefix("python")
    return ["install", "--quiet", "--no-compile", "--target", target, "--only-binary=:all:",
            "--implementation", "cp", "--python-version", version,
            *(a for p in _PIP_PLATFORMS[ARCHITECTURE.name] for a in ("--platform", p)),
            "--constraint", f"{source}/{CONSTRAINTS}", *requirements]


@jsii.implements(ILocalBundling)
class LocalPipBundling:
    """Bundles on this machine with pip; returns False (-> docker) when pip fails."""

    def __init__(self, requirements: list[str]) -> None:
        self.requirements = requirements

    def try_bundle(self, output_dir: str, *args, **kwargs) -> bool:
        try:
            subprocess.run([sys.executable, "-m", "pip", *pip_arguments(self.requirements, source=str(REPO_ROOT),
                                                                        target=output_dir)], check=True)
        except (OSError, subprocess.CalledProcessError) as exc:
            print(f"local Lambda bundling failed ({exc}); trying docker", file=sys.stderr)
            return False
        for source in SOURCES:
            shutil.copytree(REPO_ROOT / source, Path(output_dir) / source, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "tests"))
        return True


def lambda_code() -> lambda_.Code:
    """The one code asset of all handlers (handler ``functions.<name>.handler.handler``).

    Its hash is the hash of the sources (atlas/, functions/, pyproject.toml, the constraints), so
    ``cdk diff`` shows a code change exactly when one of them changed.
    """
    requirements = lambda_requirements()
    copy_sources = " && ".join(f"cp -r /asset-input/{s} /asset-output/" for s in SOURCES)
    return lambda_.Code.from_asset(
        str(REPO_ROOT), asset_hash_type=AssetHashType.SOURCE,
        exclude=["*", *(f"!{s}" for s in SOURCES), *(f"!{s}/**" for s in SOURCES), "!pyproject.toml",
                 "!containers", f"!{CONSTRAINTS}", "**/__pycache__"],
        bundling=BundlingOptions(
            image=RUNTIME.bundling_image, platform=f"linux/{ARCHITECTURE.name}",
            local=LocalPipBundling(requirements),
            command=["bash", "-c", "pip " + " ".join(f"'{a}'" for a in pip_arguments(
                requirements, source="/asset-input", target="/asset-output")) + f" && {copy_sources}"]))
