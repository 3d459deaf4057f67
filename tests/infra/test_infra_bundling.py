"""Lambda code asset: the handlers' packages, pinned as tested, as wheels for the Lambda runtime."""
from __future__ import annotations

import re
import tomllib

from infra.bundling import (
    ARCHITECTURE,
    CONSTRAINTS,
    LAMBDA_PACKAGES,
    REPO_ROOT,
    RUNTIME,
    LocalPipBundling,
    lambda_requirements,
    pip_arguments,
)


def test_requirements_come_from_pyproject_with_extras_and_ranges():
    dependencies = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    requirements = lambda_requirements()
    assert len(requirements) == len(LAMBDA_PACKAGES) and set(requirements) <= set(dependencies)
    assert any(r.startswith("aws-lambda-powertools[") and "parser" in r and "tracer" in r for r in requirements)


def test_every_lambda_package_is_pinned_by_the_tested_constraints():
    pinned = {line.split("==")[0] for line in (REPO_ROOT / CONSTRAINTS).read_text().splitlines() if "==" in line}
    assert set(LAMBDA_PACKAGES) <= pinned


def test_pip_installs_wheels_for_the_lambda_runtime_and_architecture():
    args = pip_arguments(["numpy"], source="/src", target="/out")
    assert ("--only-binary=:all:" in args and args[args.index("--target") + 1] == "/out"
            and args[args.index("--python-version") + 1] == RUNTIME.name.removeprefix("python")
            and args[args.index("--constraint") + 1] == f"/src/{CONSTRAINTS}")
    platforms = [args[i + 1] for i, a in enumerate(args) if a == "--platform"]
    arch = {"arm64": "aarch64", "x86_64": "x86_64"}[ARCHITECTURE.name]
    assert platforms == [f"manylinux_2_28_{arch}", f"manylinux2014_{arch}"]


def test_local_bundling_hands_over_to_docker_when_pip_cannot_install(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # offline: the package below cannot be found
    bundler = LocalPipBundling(["atlas-package-that-does-not-exist==1.0"])
    assert bundler.try_bundle(str(tmp_path)) is False
    assert not (tmp_path / "atlas").exists()
    assert re.fullmatch(r"python3\.\d+", RUNTIME.name)
