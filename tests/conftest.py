"""Shared fixtures: the real data beside the repo, and the made sample slide (once per session)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (real, licensed test data; read in place, never copied into the repo)."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"real test data not found at {SHARED_DATA}; tests expect ../shared/data beside the repo")
    return SHARED_DATA


@pytest.fixture(scope="session")
def sample_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """(slide_dir, truth_dir) of the made sample slide; treat as read-only (copy it to change it)."""
    from atlas.slide.sample import make_sample

    return make_sample(tmp_path_factory.mktemp("sample"))


@pytest.fixture(scope="session")
def sample_slide(sample_dirs) -> Path:
    return sample_dirs[0]


@pytest.fixture
def slide_copy(sample_slide, tmp_path) -> Path:
    """A private copy of the sample slide that a test may break."""
    return Path(shutil.copytree(sample_slide, tmp_path / sample_slide.name))


@pytest.fixture(scope="session")
def sample_run(sample_slide, tmp_path_factory) -> Path:
    """Results folder of one full local run of the sample slide, shared by the end-to-end tests."""
    from atlas.pipeline.local import run_pipeline

    out = tmp_path_factory.mktemp("sample-run")
    run_pipeline(sample_slide, out)
    return out
