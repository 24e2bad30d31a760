"""``S3Source``: a read-only object source over Amazon S3 (``s3://<bucket>/<prefix>``), for ``scalebus ingest``.

Implements ``base.ObjectSource`` (the read half of the object-store port): ListObjectsV2 page by page, and GETs
streamed into the caller's sink through a fixed :data:`READ_BLOCK_BYTES` buffer, conditional on the listed ETag
(``If-Match``) so an object rewritten mid-copy fails loudly instead of mixing versions. The only module that
imports ``boto3``/``botocore`` (optional extra ``scalebus[s3]``), and only when a source is opened.

Credentials come from the standard AWS chain (environment variables, ``ingest.profile`` or ``AWS_PROFILE``, the
instance's or container's role); ``ingest.endpoint_url`` points at S3-compatible stores and test peers.

Retries are botocore's own *standard* mode (``ingest.max_attempts`` attempts per request; throttling, 5xx and
connection errors, jittered exponential back-off), not a tenacity policy: botocore already knows S3's
throttling codes and its retry quota, and a second layer would multiply attempts. What botocore cannot retry is a
response body that breaks part-way: :meth:`S3Source.read_into` then resumes with a ranged GET from the last byte
received (at most ``max_attempts`` times, and only while bytes keep arriving).

For server-side copies (S3 → ADLS) :meth:`S3Source.copy_source` presigns a GET (SigV4, local computation, no
request) that the destination service reads the object through.

Whether an error is transient follows from the S3 error code and HTTP status, never from a message: throttling,
5xx and connection errors become ``TransientStorageError``; NoSuchBucket ``BucketNotFoundError``; AccessDenied a
permanent ``StorageError`` naming the permissions needed. Messages carry the bucket, key and error code only.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO

import structlog

from scalebus import errors
from scalebus.backends import base
from scalebus.settings import IngestSettings

if TYPE_CHECKING:
    from botocore.client import BaseClient

log = structlog.get_logger(__name__)

SCHEME = "s3"
READ_BLOCK_BYTES = 1024 * 1024
"""Most one GET in flight holds in memory: the body is read and written on in blocks of this size."""
LIST_PAGE = 1000
"""Keys per ListObjectsV2 page (S3's maximum)."""
PERMISSIONS_HINT = "the identity needs s3:ListBucket on the bucket and s3:GetObject on its objects"

_PLAIN_MD5 = re.compile(r"^[0-9a-f]{32}$")
_KMS = frozenset({"aws:kms", "aws:kms:dsse"})
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "RequestThrottled",
        "TooManyRequestsException",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "InternalError",
        "ServiceUnavailable",
    }
)
_ACCESS_CODES = frozenset(
    {
        "AccessDenied",
        "AllAccessDisabled",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "TokenRefreshRequired",
    }
)
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NotFound", "404"})


@dataclass(frozen=True, slots=True)
class S3Uri:
    """A parsed ``s3://<bucket>/<key or prefix>`` URI (the key percent-decoded)."""

    bucket: str
    key: str

    @classmethod
    def parse(cls, uri: str) -> S3Uri:
        parts = urllib.parse.urlsplit(uri)
        if parts.scheme != SCHEME or not parts.netloc or parts.query or parts.fragment:
            raise errors.UserInputError(f"{uri!r}: not an S3 URI (s3://<bucket>/<prefix>)")
        return cls(bucket=parts.netloc, key=urllib.parse.unquote(parts.path).lstrip("/"))

    def uri_of(self, key: str) -> str:
        return f"{SCHEME}://{self.bucket}/{urllib.parse.quote(key)}"


def open_source(settings: IngestSettings, *, endpoint_url: str = "") -> S3Source:
    """An S3 source authenticated by the AWS chain; ``endpoint_url`` (``--endpoint-url``) beats the setting."""
    import boto3
    from botocore import exceptions as botocore_exc
    from botocore.config import Config

    try:
        session = boto3.session.Session(profile_name=settings.profile or None, region_name=settings.region or None)
    except botocore_exc.ProfileNotFound:
        raise errors.ConfigError(
            "ingest.profile", f"AWS profile {settings.profile!r} not found", "name a profile in ~/.aws/config"
        ) from None
    config = Config(
        retries={"mode": "standard", "max_attempts": settings.max_attempts},
        read_timeout=settings.read_timeout_s,
        connect_timeout=min(settings.read_timeout_s, 10.0),
        max_pool_connections=settings.max_concurrency + 2,
        s3={"addressing_style": settings.addressing_style},
        signature_version="s3v4",  # presigned URLs too (boto3 presigns with SigV2 otherwise, which S3 retires)
    )
    with _translated("s3 client"):
        client = session.client("s3", endpoint_url=endpoint_url or settings.endpoint_url or None, config=config)
    return S3Source(client, verify_md5=settings.verify_md5, max_attempts=settings.max_attempts)


class S3Source:
    """``base.ObjectSource`` over one S3 client (thread-safe: boto3 clients may be shared between threads)."""

    def __init__(self, client: BaseClient, *, verify_md5: bool = True, max_attempts: int = 5) -> None:
        self._client = client
        self._verify_md5 = verify_md5
        self._max_attempts = max_attempts

    def close(self) -> None:
        self._client.close()

    # ------------------------------------------------------------------------------------------ list

    def list_files(self, uri: str) -> Iterator[base.RemoteObject]:
        """Every object under the prefix as a folder (``data`` lists ``data/...``, never ``data2``); zero-byte
        folder markers (keys ending in ``/``) are skipped. A URI naming one object yields it under its base
        name."""
        where = S3Uri.parse(uri)
        prefix = where.key.rstrip("/")
        folder = prefix + "/" if prefix else ""
        found = False
        for item in self._pages(where.bucket, folder, what=f"list {uri}"):
            key = str(item["Key"])
            size = int(item["Size"])
            if key.endswith("/") and size == 0:
                continue
            found = True
            yield _remote(where, item, key=key, rel_path=key[len(folder) :])
        if found:
            return
        head = self._head(where.bucket, prefix, what=f"head {uri}") if prefix else None
        if head is None:
            raise errors.ObjectNotFoundError(f"{uri}: not found (no objects under this prefix)")
        yield _remote(where, head, key=prefix, rel_path=prefix.rsplit("/", 1)[-1])

    def _head(self, bucket: str, key: str, *, what: str) -> dict[str, Any] | None:
        """The listing fields of one object, or ``None`` if there is no such object."""
        try:
            with _translated(what):
                head = self._client.head_object(Bucket=bucket, Key=key)
        except errors.BucketNotFoundError:
            raise
        except errors.ObjectNotFoundError:
            return None
        return {"Size": head["ContentLength"], "ETag": head["ETag"], "LastModified": head.get("LastModified")}

    def _pages(self, bucket: str, prefix: str, *, what: str) -> Iterator[dict[str, Any]]:
        token: str | None = None
        while True:
            request: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": LIST_PAGE}
            if token:
                request["ContinuationToken"] = token
            with _translated(what):
                page = self._client.list_objects_v2(**request)
            yield from page.get("Contents", [])
            token = page.get("NextContinuationToken") if page.get("IsTruncated") else None
            if not token:
                return

    # ------------------------------------------------------------------------------------------ read

    def read_into(
        self, obj: base.RemoteObject, sink: BinaryIO, *, offset: int = 0, length: int | None = None
    ) -> int:
        """Stream ``[offset, offset+length)`` into ``sink``; a whole-object read is checked against the ETag when
        the ETag is a plain MD5 (single-part upload) and the object is not KMS-encrypted (``IntegrityError``)."""
        where = S3Uri.parse(obj.uri)
        what = f"get s3://{where.bucket}/{where.key}"
        if length == 0:
            return 0
        stop = obj.size if length is None else offset + length
        whole = offset == 0 and length is None
        digest = hashlib.md5(usedforsecurity=False) if whole and self._verify_md5 and md5_etag(obj.etag) else None
        position = offset
        resumes = 0
        while True:
            request: dict[str, Any] = {"Bucket": where.bucket, "Key": where.key, "IfMatch": f'"{obj.etag}"'}
            if position or length is not None:
                request["Range"] = f"bytes={position}-{stop - 1}"
            started_at = position
            try:
                with _translated(what):
                    response = self._client.get_object(**request)
                    if response.get("ServerSideEncryption") in _KMS or response.get("SSECustomerAlgorithm"):
                        digest = None  # the ETag of an encrypted object is not the MD5 of its bytes
                    body = response["Body"]
                    try:
                        while block := body.read(READ_BLOCK_BYTES):
                            sink.write(block)
                            if digest is not None:
                                digest.update(block)
                            position += len(block)
                    finally:
                        body.close()
            except errors.TransientStorageError:
                resumes += 1
                if position == started_at or resumes >= self._max_attempts:
                    raise  # nothing arrived: botocore has already retried the request itself
                if position >= stop:
                    break
                log.info("s3.get.resume", bucket=where.bucket, key=where.key, at_byte=position, resumes=resumes)
                continue
            break
        if digest is not None and digest.hexdigest() != obj.etag:
            raise errors.IntegrityError(f"{what}: MD5 {digest.hexdigest()} does not match the ETag {obj.etag}")
        return position - offset

    # ------------------------------------------------------------------------------------------ copy source

    def copy_source(self, obj: base.RemoteObject, *, expires_s: int) -> tuple[str, bytes | None]:
        """A presigned GET URL another service can read ``obj`` through (for server-side copies), and the MD5 of
        its bytes when the ETag is one (single-part upload; a KMS-encrypted object's is not, which the reader's
        MD5 check then reports)."""
        where = S3Uri.parse(obj.uri)
        with _translated(f"presign s3://{where.bucket}/{where.key}"):
            url = self._client.generate_presigned_url(
                "get_object", Params={"Bucket": where.bucket, "Key": where.key}, ExpiresIn=expires_s
            )
        return str(url), bytes.fromhex(obj.etag) if md5_etag(obj.etag) else None


def md5_etag(etag: str) -> bool:
    """Whether an S3 ETag is the MD5 of the object's bytes: single-part uploads (multipart ETags end in ``-N``).
    Objects encrypted with KMS keys are the exception, detected on GET."""
    return bool(_PLAIN_MD5.match(etag))


def _remote(where: S3Uri, item: dict[str, Any], *, key: str, rel_path: str) -> base.RemoteObject:
    modified = item.get("LastModified")
    return base.RemoteObject(
        uri=where.uri_of(key),
        rel_path=rel_path,
        size=int(item["Size"]),
        etag=str(item["ETag"]).strip('"'),
        modified_at=modified.timestamp() if modified is not None else None,
    )


@contextlib.contextmanager
def _translated(what: str) -> Iterator[None]:
    """botocore exceptions → ours, chained (``raise ... from exc``); ours pass through."""
    try:
        yield
    except errors.ScalebusError:
        raise
    except Exception as exc:
        raise to_scalebus(exc, what=what) from exc


def to_scalebus(exc: BaseException, *, what: str) -> errors.ScalebusError:
    """The scalebus error for one botocore (or socket) exception, by error code and status, never by message."""
    from botocore import exceptions as botocore_exc

    if isinstance(exc, botocore_exc.ClientError):
        response: dict[str, Any] = exc.response or {}
        code = str(response.get("Error", {}).get("Code", ""))
        status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        detail = f"{code or 'error'}, HTTP {status}"
        if code == "NoSuchBucket":
            return errors.BucketNotFoundError(
                f"{what}: no such bucket (NoSuchBucket); check the bucket in the URI"
            )
        if code in _NOT_FOUND_CODES or status == 404:
            return errors.ObjectNotFoundError(f"{what}: not found ({detail})")
        if code in _ACCESS_CODES or status == 403:
            return errors.StorageError(f"{what}: access denied ({detail}); {PERMISSIONS_HINT}")
        if code == "PreconditionFailed" or status == 412:
            return errors.StorageError(f"{what}: changed since it was listed (ETag no longer matches); run again")
        if code in _TRANSIENT_CODES or status in errors.TRANSIENT_HTTP_STATUS:
            return errors.TransientStorageError(f"{what}: {detail}")
        return errors.StorageError(f"{what}: {detail}")
    if isinstance(exc, botocore_exc.NoCredentialsError | botocore_exc.PartialCredentialsError):
        return errors.ConfigError(
            "ingest.profile",
            f"no usable AWS credentials for {what} ({type(exc).__name__})",
            "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or ingest.profile, or attach a role",
        )
    if isinstance(exc, botocore_exc.FlexibleChecksumError):
        return errors.IntegrityError(f"{what}: the body does not match the checksum S3 sent")
    transient = (
        botocore_exc.ConnectionError,
        botocore_exc.HTTPClientError,
        botocore_exc.IncompleteReadError,
        botocore_exc.CredentialRetrievalError,
        OSError,
        TimeoutError,
    )
    if isinstance(exc, transient):
        return errors.TransientStorageError(f"{what}: connection failed ({type(exc).__name__})")
    return errors.StorageError(f"{what}: {type(exc).__name__}")
