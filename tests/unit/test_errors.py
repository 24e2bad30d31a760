"""Errors keep their type and attributes through pickle: a staging helper process hands its failure to the
staging process, which decides transient vs permanent by the type."""

from __future__ import annotations

import pickle

import pytest

from scalebus import errors

SAMPLES = [
    errors.ConfigError("staging.processes", "must be at least 0", "set 0 for auto"),
    errors.InvalidJobError("SchemaInvalid", "inputs: missing"),
    errors.RejectJob("ObjectNotFound", "abfss://x: gone"),
    errors.TransientStorageError("503 ServerBusy", retry_after_s=2.5),
    errors.TransientQueueError("link detached", retry_after_s=None),
    errors.IntegrityError("a.bin: Content-MD5 mismatch"),
    errors.UnsafePathError("'../x': has a '..' segment"),
    errors.StorageError("disk full"),
    errors.SecretNotFoundError("secret db-password: not found"),
]


@pytest.mark.parametrize("error", SAMPLES, ids=[type(e).__name__ for e in SAMPLES])
def test_errors_pickle_with_type_message_and_attributes(error: errors.ScalebusError) -> None:
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error)
    assert copy.__dict__ == error.__dict__
    assert isinstance(copy, errors.BackendError) == isinstance(error, errors.BackendError)
    assert getattr(copy, "transient", None) == getattr(error, "transient", None)
