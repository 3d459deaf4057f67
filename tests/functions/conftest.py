"""Fixtures for the Lambda handlers: AWS emulated in-process by moto, events in their real shapes.

``cloud`` is the same set of resources the demo builds (localcloud.demo.LocalCloud), with the ingest
bucket's own EventBridge notifications switched off: tests deliver S3 events built from
``tests/events/s3_object_created.json`` (the shape AWS sends, increasing sequencers) in whatever
order and multiplicity they want. The catalog's own events still flow through the EventBridge rule
to the queue, from where ``Ingest.settle`` hands them to the trigger handler.
"""
from __future__ import annotations

import copy
import hashlib
import json
import uuid
from pathlib import Path
from urllib.parse import quote_plus

import boto3
import pytest
from fake_aws import use_fake_aws
from moto import mock_aws

from atlas.slide.convention import SLIDE_MANIFEST, manifest_bytes, slide_manifest
from localcloud.demo import HANDLERS, LambdaContext, LocalCloud, load_handler

EVENTS = Path(__file__).resolve().parents[1] / "events"


def read_event(name: str) -> dict:
    """A real-shaped event from tests/events/ (a fresh copy)."""
    return copy.deepcopy(json.loads((EVENTS / name).read_text()))


@pytest.fixture
def load_event():
    """``load_event(name)``: a fresh copy of tests/events/<name>."""
    return read_event


@pytest.fixture(autouse=True)
def aws_env(monkeypatch):
    """Fake credentials and region; no endpoint override (moto intercepts in-process); no X-Ray."""
    use_fake_aws(monkeypatch, POWERTOOLS_SERVICE_NAME="atlas-test", POWERTOOLS_TRACE_DISABLED="1")


@pytest.fixture
def lambda_context() -> LambdaContext:
    return LambdaContext(function_name="atlas-test")


@pytest.fixture
def wire_cloud(monkeypatch):
    """``wire_cloud(name)``: LocalCloud ``name`` on whatever endpoint the caller set up, ingest
    notifications off, its handlers loaded with their settings in the environment (shared by the
    in-process ``cloud`` below and the server-backed one of the concurrency test)."""
    def wire(name: str) -> LocalCloud:
        local = LocalCloud.create(name)
        boto3.client("s3").put_bucket_notification_configuration(Bucket=local.ingest_bucket,
                                                                 NotificationConfiguration={})
        for key, value in local.settings.to_env().items():
            monkeypatch.setenv(key, value)
        local.handlers = {n: load_handler(n) for n in HANDLERS}
        return local

    return wire


@pytest.fixture
def cloud(wire_cloud):
    """The emulated resources and the three handlers, imported with their settings in the environment."""
    with mock_aws():
        yield wire_cloud("t")


class Ingest:
    """Puts objects into the emulated ingest bucket the way an uploader would and makes their events."""

    def __init__(self, cloud: LocalCloud):
        self.cloud, self.s3, self.sequence = cloud, boto3.client("s3"), 0x617F08299329D189

    def put(self, slide_id: str, rel: str, data: bytes) -> dict:
        """Upload one object (with its sha256 as metadata, like `atlas upload`); returns its S3 event."""
        key = f"{slide_id}/{rel}"
        version = self.s3.put_object(Bucket=self.cloud.ingest_bucket, Key=key, Body=data,
                                     Metadata={"sha256": hashlib.sha256(data).hexdigest()})["VersionId"]
        return self.event(key, version)

    def event(self, key: str, version_id: str) -> dict:
        """The Object Created event AWS sends for this object version (keys URL-encoded, as AWS does)."""
        head = self.s3.head_object(Bucket=self.cloud.ingest_bucket, Key=key, VersionId=version_id)
        self.sequence += 1
        event = read_event("s3_object_created.json")
        event["id"] = str(uuid.uuid4())
        event["resources"] = [f"arn:aws:s3:::{self.cloud.ingest_bucket}"]
        event["detail"]["bucket"]["name"] = self.cloud.ingest_bucket
        event["detail"]["object"] = {"key": quote_plus(key, safe="/"), "size": head["ContentLength"],
                                     "etag": head["ETag"].strip('"'), "version-id": version_id,
                                     "sequencer": f"{self.sequence:018X}"}
        return event

    def put_folder(self, slide_dir: Path, slide_id: str | None = None, *, manifest: bool = True,
                   only: tuple[str, ...] | None = None) -> list[dict]:
        """Upload a slide folder file by file (a freshly built manifest.json last); events in upload order."""
        slide_id = slide_id or slide_dir.name
        doc = slide_manifest(slide_dir, slide_id)
        events = [self.put(slide_id, f["path"], (slide_dir / f["path"]).read_bytes()) for f in doc["files"]
                  if only is None or f["path"] in only]
        if manifest:
            events.append(self.put(slide_id, SLIDE_MANIFEST, manifest_bytes(doc)))
        return events

    def deliver(self, event: dict) -> dict:
        """Hand one event to the handler its rule targets."""
        return self.cloud.invoke(self.cloud.route(event), event)

    def settle(self) -> list[dict]:
        """Deliver queued events (the catalog's, to the trigger) until none are left; their results."""
        results = []
        while events := self.cloud.receive():
            results.extend(self.deliver(e) for e in events)
        return results

    def upload_and_settle(self, slide_dir: Path, slide_id: str | None = None, **kwargs) -> list[dict]:
        results = [self.deliver(e) for e in self.put_folder(slide_dir, slide_id, **kwargs)]
        return results + self.settle()


@pytest.fixture
def ingest(cloud) -> Ingest:
    return Ingest(cloud)

