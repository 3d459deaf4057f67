"""``s3://bucket/prefix/`` URIs as used by the stage jobs, the release and the executor."""
from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass(frozen=True)
class S3Uri:
    """A bucket and a key prefix (``""`` or ending in ``/``) or a key.

    Attributes
    ----------
    bucket : str
    key : str
        Without a leading ``/``; a prefix ends in ``/``.
    """

    bucket: str
    key: str = ""

    @classmethod
    def parse(cls, uri: str) -> S3Uri:
        """Parse ``s3://bucket/key``; ValueError names the bad URI."""
        parts = urlsplit(uri)
        if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
            raise ValueError(f"{uri!r} is not an S3 URI like s3://bucket/prefix/")
        return cls(parts.netloc, parts.path.lstrip("/"))

    def prefix(self) -> S3Uri:
        """The same location as a prefix (trailing ``/``; the bucket root stays ``""``)."""
        return self if not self.key or self.key.endswith("/") else S3Uri(self.bucket, self.key + "/")

    def join(self, *parts: str) -> S3Uri:
        """The key ``parts`` below this prefix, e.g. ``work.join("qc", "provenance", "stitch.json")``."""
        rel = "/".join(p.strip("/") for p in parts if p.strip("/"))
        return S3Uri(self.bucket, self.prefix().key + rel)

    @property
    def name(self) -> str:
        """Last path component, e.g. the slide id of ``s3://ingest/S1/``."""
        return self.key.rstrip("/").rsplit("/", 1)[-1]

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"
