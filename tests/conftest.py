"""Shared fixtures: the real data beside the repo, and the made sample slide (once per session)."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Real, licensed test data: ``../shared/data`` read in place, else fetched once (tests/realdata.py)."""
    from realdata import data_root

    try:
        return data_root()
    except Exception as exc:  # noqa: BLE001 - any fetch failure: say where the data should come from
        pytest.fail(f"real test data: ../shared/data is not beside the repository and fetching it failed ({exc}); "
                    "see tests/realdata.py")


@pytest.fixture(scope="session")
def dsb(shared_data) -> tuple[np.ndarray, np.ndarray]:
    """(image, labels) of the DSB2018 nucleus test image: (512, 512) uint16 each, read-only."""
    folder = shared_data / "segmentation" / "stardist_dsb2018"
    image, mask = tifffile.imread(folder / "img2d.tif"), tifffile.imread(folder / "mask2d.tif")
    for array in (image, mask):
        array.setflags(write=False)
    return image, mask


@pytest.fixture
def s3(monkeypatch, request):
    """An S3 client on moto's in-process mock, with the test module's ``BUCKETS`` created.

    botocore does not retry (a test that injects a failure sees it once); credentials are fake.
    """
    import boto3
    from botocore.config import Config
    from fake_aws import use_fake_aws
    from moto import mock_aws

    use_fake_aws(monkeypatch)
    with mock_aws():
        client = boto3.client("s3", config=Config(retries={"max_attempts": 1}))
        for bucket in getattr(request.module, "BUCKETS", ()):
            client.create_bucket(Bucket=bucket)
        yield client


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
