"""Our own error hierarchy.

Client-library exceptions never cross a port: adapters translate them (``raise ... from exc``) so the
controller and worker decide on the *type* — transient or permanent — never on a message string.
"""

from __future__ import annotations


class ScalebusError(Exception):
    """Base of every error scalebus raises on purpose.

    Errors pickle with their type and attributes intact (constructors differ, so the default, which calls
    ``cls(*args)``, would fail or drop ``retry_after_s``): a staging helper process hands its failure to the
    parent, which must still tell transient from permanent by the type.
    """

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild, (type(self), self.args, dict(self.__dict__)))


class ConfigError(ScalebusError):
    """A setting is missing or invalid. The message names the key and the fix."""

    def __init__(self, key: str, problem: str, fix: str) -> None:
        self.key = key
        self.problem = problem
        self.fix = fix
        super().__init__(f"config {key}: {problem} — {fix}")


class UserInputError(ScalebusError):
    """A command-line mistake (unreadable file, bad flag value). Printed as one line, no traceback."""


class InvalidJobError(ScalebusError):
    """A job message fails validation. Producers see it at submit time; workers dead-letter it."""

    def __init__(self, reason: str, description: str) -> None:
        self.reason = reason
        self.description = description
        super().__init__(f"{reason}: {description}")


class BackendError(ScalebusError):
    """An external system failed. ``transient`` says whether trying again later can help."""

    transient: bool = False


TRANSIENT_HTTP_STATUS = frozenset({408, 429, 500, 502, 503, 504})
"""HTTP statuses that may pass on their own (timeout, throttling, server errors): an adapter maps them to a
:class:`TransientBackendError`. Services with more transient answers document them as a union with this set."""


class TransientBackendError(BackendError):
    """Timeouts, throttling, 5xx, dropped connections: back off and try again."""

    transient = True

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(message)


class PermanentBackendError(BackendError):
    """Authorisation, not found, bad request: retrying the same call cannot help."""


class QueueError(BackendError):
    """The job queue failed."""


class TransientQueueError(QueueError, TransientBackendError):
    """The job queue failed in a way that may pass."""


class LockLostError(QueueError):
    """The message lock expired or was taken by another receiver: this worker no longer owns the job."""


class QueueNotFoundError(QueueError, PermanentBackendError):
    """The configured queue does not exist."""


class AccessDeniedError(PermanentBackendError):
    """The identity signed in but lacks a right the call needs (a missing role or claim); the message names it.
    Callers that can do without that one call catch this type and carry on with less."""


class QueueAccessDenied(QueueError, AccessDeniedError):
    """A queue call needs a right the identity lacks, such as Manage for the admin API's runtime counts."""


class ScaleSetError(BackendError):
    """The scale set failed."""


class TransientScaleSetError(ScaleSetError, TransientBackendError):
    """The scale set is throttled or briefly unavailable."""


class InstanceNotFoundError(ScaleSetError, PermanentBackendError):
    """The named instance does not exist (already deleted counts as success for self-destroy)."""


class StorageError(BackendError):
    """The object store failed."""


class TransientStorageError(StorageError, TransientBackendError):
    """The object store failed in a way that may pass (timeouts, 503 ServerBusy, resets)."""


class ObjectNotFoundError(StorageError, PermanentBackendError):
    """The object or folder does not exist."""


class BucketNotFoundError(ObjectNotFoundError):
    """The bucket (S3) a URI names does not exist: a mistake in the URI, reported like a user error."""


class UnsafePathError(StorageError, PermanentBackendError):
    """A remote name would escape the staging directory or is not representable locally."""


class IntegrityError(StorageError):
    """A downloaded file does not match its size or checksum."""


class SourceChangedError(TransientStorageError):
    """The file read is not the file listed (its size, modification time or etag moved on): the bytes may mix two
    versions. Trying again lists it afresh."""


class OutputConflictError(StorageError, PermanentBackendError):
    """The output folder holds a commit another job (or an unknown writer) made: this job must not complete on it
    nor write into it. A job that hits it is dead-lettered with reason ``OutputConflict``."""


class LocalDiskError(BackendError):
    """This machine's own disk failed (full, over quota, read-only, I/O error) while staging or publishing.

    Not the data lake's fault and not the job's: the worker holds back and another machine may succeed.
    ``transient`` without being a :class:`TransientBackendError`, so it is never taken for a network or storage
    failure."""

    transient = True


class IdentityError(BackendError):
    """This process cannot tell which instance it runs on."""


class SecretError(BackendError):
    """The secret source failed (access denied, unreadable). Messages name the secret, never its value."""


class TransientSecretError(SecretError, TransientBackendError):
    """The secret source is throttled or briefly unavailable."""


class SecretNotFoundError(SecretError, PermanentBackendError):
    """No such secret (or it is disabled): a job that needs it is dead-lettered with reason ``SecretNotFound``."""


class NoticeError(BackendError):
    """Scheduled events (IMDS, or the local pool's notices) could not be read or acknowledged."""


class TransientNoticeError(NoticeError, TransientBackendError):
    """The notice source is throttled or briefly unavailable: the next poll asks again."""


class LeaseError(BackendError):
    """The controllers' lease could not be read, acquired, renewed or released."""


class TransientLeaseError(LeaseError, TransientBackendError):
    """The lease's store is throttled or briefly unavailable: the holder tries again while its lease lasts."""


class LeaseLostError(LeaseError, PermanentBackendError):
    """Another holder has the lease now (or it was released): this one must stop acting on it."""


class SelfDestroyRefused(ScalebusError):
    """A guard stopped self-destroy (not in a scale set, identity mismatch, a job lock still held)."""


class JobError(ScalebusError):
    """Raised by job handling to choose how the message is settled."""


class RetryJob(JobError):
    """Give the job back (abandon): another attempt may succeed."""


class StagingCancelled(RetryJob):
    """Staging stopped before its end because the job is being given back (eviction notice, drain deadline, lost
    lock): the reads in flight are cut off at their next write, nothing more is fetched."""


class RejectJob(JobError):
    """The job can never succeed: dead-letter it with this reason."""

    def __init__(self, reason: str, description: str) -> None:
        self.reason = reason
        self.description = description
        super().__init__(f"{reason}: {description}")


class DuplicateJobError(QueueError, PermanentBackendError):
    """A message with this id is already in the queue."""


def _rebuild(cls: type[ScalebusError], args: tuple[object, ...], state: dict[str, object]) -> ScalebusError:
    """Unpickle an error without calling its constructor (see :meth:`ScalebusError.__reduce__`)."""
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error
