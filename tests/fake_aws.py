"""Fake AWS credentials for the tests against moto's in-process mock: boto3 never reaches a real
account, a developer's profile or an endpoint set in the shell."""
from __future__ import annotations

import pytest

FAKE_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_SESSION_TOKEN": "testing"}


def use_fake_aws(mp: pytest.MonkeyPatch, region: str = "us-east-1", **env: str) -> None:
    """Set fake credentials, ``region`` as the default region and ``env``; unset endpoint and profile.

    ``mp`` is the ``monkeypatch`` fixture or a ``pytest.MonkeyPatch.context()`` (module-scoped fixtures).
    """
    for key in ("AWS_ENDPOINT_URL", "AWS_PROFILE"):
        mp.delenv(key, raising=False)
    for key, value in {**FAKE_CREDENTIALS, "AWS_DEFAULT_REGION": region, **env}.items():
        mp.setenv(key, value)
