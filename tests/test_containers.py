"""The Batch images: Dockerfiles lint clean, are pinned and non-root, and get what they copy.

No docker engine here: the images are built by ``cdk deploy`` (docs/containers.md). These tests check
what can be checked without building: hadolint, the build context as CDK stages it, the dependency
pins, the weights check the build runs, and that the paths the images set match what the code reads.
"""
from __future__ import annotations

import functools
import hashlib
import http.server
import importlib.util
import re
import shutil
import subprocess
import sys
import threading
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted(ROOT.glob("containers/*/Dockerfile"))

def _load(path: Path):
    """A script of containers/ (not a package) as a module."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fetch_weights = _load(ROOT / "containers" / "fetch_weights.py")


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines, current = [], ""
    for raw in dockerfile.read_text().splitlines():
        if raw.lstrip().startswith("#") or not raw.strip():
            continue
        current += raw.rstrip("\\").strip() + " "
        if not raw.rstrip().endswith("\\"):
            lines.append(current.strip())
            current = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def arg_defaults(dockerfile: Path) -> dict[str, str]:
    return {m.group(1): m.group(2) for kind, args in instructions(dockerfile) if kind == "ARG"
            for m in [re.match(r"(\w+)=(.*)", args)] if m}


def final_stage(dockerfile: Path) -> list[tuple[str, str]]:
    steps = instructions(dockerfile)
    last_from = max(i for i, (kind, _) in enumerate(steps) if kind == "FROM")
    return steps[last_from:]


def env_of(dockerfile: Path) -> dict[str, str]:
    env = {}
    for kind, args in final_stage(dockerfile):
        if kind == "ENV":
            env.update(dict(re.findall(r"(\w+)=(\S+)", args)))
    return env


def test_every_image_a_stage_runs_in_is_built_and_every_image_runs_a_stage():
    """The registry names each stage's image; CDK builds containers/<image>/Dockerfile for it."""
    from atlas.stages import STAGES

    wanted = {stage.image for stage in STAGES}
    built = {p.parent.name for p in DOCKERFILES}
    assert wanted == built, f"stages run in {sorted(wanted)}, Dockerfiles exist for {sorted(built)}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_hadolint_finds_nothing(dockerfile):
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    proc = subprocess.run([hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True, check=False)
    assert (proc.returncode, proc.stdout + proc.stderr) == (0, "")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_base_images_are_pinned_to_exact_versions(dockerfile):
    args = arg_defaults(dockerfile)
    stages = set()
    for kind, line in instructions(dockerfile):
        if kind != "FROM":
            continue
        image, _, alias = line.partition(" AS ")
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image.strip())
        if image in stages:  # an earlier stage of this file
            continue
        stages.add(alias.strip())
        _, _, tag = image.partition(":")
        assert "@sha256:" in image or re.match(r"\d+\.\d+\.\d+-", tag), f"{image} is not pinned to an exact version"
    assert "pip install" not in dockerfile.read_text().replace("pip install --requirement", "").replace(
        "pip install --no-deps /src", ""), "install Python packages only from the constraints (or the project itself)"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_official_base_images_are_pinned_by_a_documented_digest(dockerfile):
    """python and node (Docker Official Images) as ``name:tag@sha256:...``, each digest listed in
    docs/containers.md with the docker-library/repo-info record it was taken from."""
    docs = (ROOT / "docs" / "containers.md").read_text()
    args = arg_defaults(dockerfile)
    for arg in ("PYTHON_IMAGE", "NODE_IMAGE"):
        match = re.fullmatch(r"(python|node):([\w.-]+)@(sha256:[0-9a-f]{64})", args[arg])
        assert match, f"{arg}={args[arg]} is not name:tag@sha256:digest"
        name, tag, digest = match.groups()
        assert any(f"`{name}:{tag}`" in line and f"`{digest}`" in line and f"repos/{name}/remote/{tag}.md" in line
                   for line in docs.splitlines()), f"{name}:{tag}@{digest} is not documented in docs/containers.md"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_images_run_atlas_as_a_non_root_user_under_an_init(dockerfile):
    final = final_stage(dockerfile)
    users = [args for kind, args in final if kind == "USER"]
    assert users and re.fullmatch(r"[1-9]\d*:[1-9]\d*", users[-1]), "the job must not run as root"
    entrypoint = [args for kind, args in final if kind == "ENTRYPOINT"]
    # tini forwards SIGTERM (Batch job termination, Spot reclaim) to atlas and reaps children
    assert entrypoint == ['["tini", "--", "atlas"]']
    env = env_of(dockerfile)
    assert env["ATLAS_SCRATCH"] == "/scratch" and env["PYTHONUNBUFFERED"] == "1"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_images_point_the_code_at_what_they_install(dockerfile):
    from atlas.aws.job import SCRATCH_ENV
    from atlas.science.overview.site import VIEWER_ENV, default_viewer_dir
    from atlas.science.segmentation.unet import SHA256_ENV, WEIGHTS_ENV

    env = env_of(dockerfile)
    text = dockerfile.read_text()
    # the viewer where the render stage looks for it: the npm install copied to /opt/atlas/viewer/node_modules
    assert "COPY --from=viewer /viewer/node_modules /opt/atlas/viewer/node_modules" in text
    inside = default_viewer_dir().relative_to(ROOT / "viewer" / "node_modules").as_posix()
    assert env[VIEWER_ENV] == f"/opt/atlas/viewer/node_modules/{inside}"
    assert SCRATCH_ENV in env
    # the weights the build fetched and checked are the ones the segment stage is told to load
    assert 'fetch_weights.py "${UNET_WEIGHTS_URI}" "${UNET_WEIGHTS_SHA256}" /models/unet.onnx' in text
    assert "COPY --from=weights /models /opt/atlas/models" in text
    assert env[WEIGHTS_ENV] in ("/opt/atlas/models/unet.onnx", "${UNET_WEIGHTS_URI:+/opt/atlas/models/unet.onnx}")
    assert env[SHA256_ENV] == "${UNET_WEIGHTS_SHA256}"


def test_gpu_image_needs_weights_and_uses_the_cuda_onnxruntime():
    text = (ROOT / "containers/gpu/Dockerfile").read_text()
    assert "/models/unet.onnx --required" in text
    assert re.search(r"ARG ONNXRUNTIME_GPU=\d+\.\d+\.\d+", text)
    assert "grep -v '^onnxruntime==' /tmp/constraints.txt" in text  # the CPU build is left out, not overwritten


def test_cdk_asset_stages_exactly_what_the_images_copy(tmp_path):
    """The asset as docs/containers.md defines it: CDK stages (and hashes) the repo root through .dockerignore."""
    import aws_cdk as cdk
    from aws_cdk import aws_ecr_assets as ecr_assets

    app = cdk.App(outdir=str(tmp_path))
    ecr_assets.DockerImageAsset(cdk.Stack(app, "Images"), "CpuImage", directory=str(ROOT),
                                file="containers/cpu/Dockerfile", platform=ecr_assets.Platform.LINUX_AMD64,
                                build_args={"UNET_WEIGHTS_URI": "", "UNET_WEIGHTS_SHA256": ""})
    app.synth()
    [context] = tmp_path.glob("asset.*")
    staged = {p.relative_to(context).as_posix() for p in context.rglob("*") if p.is_file()}

    copied = set()
    for dockerfile in DOCKERFILES:
        for kind, args in instructions(dockerfile):
            if kind == "COPY" and not args.startswith("--from"):
                copied.update(args.split()[:-1])
        copied.add(dockerfile.relative_to(ROOT).as_posix())
    wanted = {".dockerignore"}
    for source in copied:
        path = ROOT / source
        assert path.exists(), f"{source} is copied by an image but not in the repository"
        wanted.update(p.relative_to(ROOT).as_posix() for p in ([path] if path.is_file() else path.rglob("*"))
                      if p.is_file() and "__pycache__" not in p.parts)
    assert staged == wanted


def test_package_data_ships_every_non_python_file_of_atlas():
    """The images install a wheel, which holds only .py files and the declared package data."""
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["atlas"]
    data = [p.relative_to(ROOT / "atlas").as_posix() for p in (ROOT / "atlas").rglob("*")
            if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts]
    assert data, "expected the overview template at least"
    assert [f for f in data if not any(fnmatch(f, pattern) for pattern in patterns)] == []


def test_constraints_pin_every_runtime_dependency_within_its_range():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {}
    for line in (ROOT / "containers/constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt line {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = version
    for spec in project["dependencies"]:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not pinned in containers/constraints.txt: run containers/lock.py"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"{req.name}=={pins[name]} in constraints.txt is outside {req.specifier}: run containers/lock.py"


@pytest.fixture
def weights_server(shared_data):
    """The real nucleus U-Net weights served over HTTP, as a weights URI would be."""
    model_dir = shared_data / "models" / "unet2d_nuclei_broad"

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(model_dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/weights.onnx", model_dir / "weights.onnx"
    server.shutdown()


def test_weights_are_baked_only_when_their_sha256_matches(weights_server, tmp_path):
    uri, source = weights_server
    sha = hashlib.sha256(source.read_bytes()).hexdigest()
    out = tmp_path / "models" / "unet.onnx"
    fetch_weights.main([uri, sha.upper(), str(out)])
    assert out.read_bytes() == source.read_bytes()

    wrong = tmp_path / "wrong" / "unet.onnx"
    with pytest.raises(SystemExit, match=f"sha256 {sha}, expected {'0' * 64}"):
        fetch_weights.main([uri, "0" * 64, str(wrong)])
    assert list(wrong.parent.iterdir()) == []  # no file, no partial download left in the image

    with pytest.raises(SystemExit, match="needs segmentation weights"):
        fetch_weights.main(["", "", str(tmp_path / "gpu" / "unet.onnx"), "--required"])
    fetch_weights.main(["", "", str(tmp_path / "cpu" / "unet.onnx")])
    assert (tmp_path / "cpu").is_dir() and list((tmp_path / "cpu").iterdir()) == []
    with pytest.raises(SystemExit, match="not a hex sha256"):
        fetch_weights.main([uri, "abc", str(tmp_path / "x.onnx")])
    with pytest.raises(SystemExit, match="pre-signed URL"):
        fetch_weights.main(["s3://bucket/unet.onnx", sha, str(tmp_path / "x.onnx")])
