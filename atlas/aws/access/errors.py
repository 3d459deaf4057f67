"""Access errors of the results bucket, each saying what to do: how access is granted, the region, credentials."""
from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

from botocore.exceptions import ClientError, NoCredentialsError

from atlas.aws.release import RESULTS_BUCKET_ENV, RESULTS_REGION
from atlas.aws.s3 import S3Uri
from atlas.errors import InvalidInput, Problem


class AccessError(InvalidInput):
    """S3 refused a request (no access, wrong region, no such bucket, no credentials); says how to fix it."""


class NotPublished(InvalidInput):
    """The slide, run or file asked for has no complete release in the bucket."""


_WRONG_REGION = ("PermanentRedirect", "AuthorizationHeaderMalformed", "IllegalLocationConstraintException", "301",
                 "AuthorizationQueryParametersError")
_CREDENTIALS = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "TokenRefreshRequired")
HOW_TO_GET_ACCESS = ("access is granted per AWS account: send your 12-digit AWS account ID (`aws sts "
                     "get-caller-identity --query Account --output text`) to the data team; reading works once they "
                     "have added it. Already granted? Your IAM user or role also needs s3:ListBucket and s3:GetObject "
                     "on the bucket, and every request must carry `x-amz-request-payer: requester` (atlas always "
                     "sends it; AWS CLI: --request-payer requester; boto3: RequestPayer='requester'; "
                     "s3fs: requester_pays=True)")


def access_error(exc: Exception, uri: S3Uri | str) -> AccessError:
    """The S3 failure ``exc`` on ``uri`` as an :class:`AccessError` that says what to do.

    Handles AccessDenied (how access is granted; the request-payer header), a wrong region
    (PermanentRedirect, AuthorizationHeaderMalformed: the bucket is in us-east-1), a missing bucket,
    bad or missing credentials. Other errors keep S3's code and message.
    """
    where = str(uri)
    if isinstance(exc, NoCredentialsError):
        return AccessError(Problem(where, "no AWS credentials found: a requester-pays bucket refuses anonymous "
                                          "requests (the reader's account pays)",
                                   "configure credentials of your own AWS account (`aws configure`, AWS_PROFILE or "
                                   "an instance role); " + HOW_TO_GET_ACCESS))
    error = exc.response.get("Error", {}) if isinstance(exc, ClientError) else {}
    code, message = error.get("Code", ""), error.get("Message", str(exc))
    headers = exc.response.get("ResponseMetadata", {}).get("HTTPHeaders", {}) if isinstance(exc, ClientError) else {}
    if code in ("AccessDenied", "403", "AllAccessDisabled"):
        return AccessError(Problem(where, f"access denied ({code}: {message})", HOW_TO_GET_ACCESS))
    if code in _WRONG_REGION:
        actual = error.get("Region") or headers.get("x-amz-bucket-region") or _region_in(message)
        said = f"the bucket answered from region {actual}" if actual else "the request went to the wrong region"
        return AccessError(Problem(where, f"wrong region ({code}): {said}; the results bucket is in {RESULTS_REGION}",
                                   f"send requests to {RESULTS_REGION} (atlas does; AWS CLI: --region "
                                   f"{RESULTS_REGION}; boto3: region_name='{RESULTS_REGION}'), and check the bucket "
                                   f"name (--bucket / {RESULTS_BUCKET_ENV}) is the one the data team gave you"))
    if code == "NoSuchBucket":
        return AccessError(Problem(where, f"bucket {error.get('BucketName') or S3Uri.parse(where).bucket!r} does not "
                                          "exist",
                                   f"use the results bucket name the data team gave you (--bucket or env "
                                   f"{RESULTS_BUCKET_ENV})"))
    if code in _CREDENTIALS:
        return AccessError(Problem(where, f"your AWS credentials were refused ({code}: {message})",
                                   "refresh or fix the credentials of your AWS account (`aws sts "
                                   "get-caller-identity` must work)"))
    return AccessError(Problem(where, f"S3 error {code or type(exc).__name__}: {message}",
                               "retry later; if it persists, send this message to the data team"))


def _region_in(message: str) -> str | None:
    # AuthorizationHeaderMalformed: "... the region 'eu-west-1' is wrong; expecting 'us-east-1'"
    found = re.search(r"expecting '([a-z0-9-]+)'", message)
    return found.group(1) if found else None


@contextmanager
def access_errors(uri: S3Uri | str) -> Iterator[None]:
    """S3 failures inside the block raised as the :class:`AccessError` for ``uri`` (with its fix)."""
    try:
        yield
    except (ClientError, NoCredentialsError) as exc:
        raise access_error(exc, uri) from exc
