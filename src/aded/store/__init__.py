"""Datastores: corpus tri-gram statistics in a checksummed, memory-mapped file of our own format."""

from aded.store.datastore import (
    FORMAT_VERSION,
    Datastore,
    DatastoreError,
    TokenizerIdentity,
    read_arrays,
    tokenizer_identity,
    write_arrays,
)

__all__ = [
    "FORMAT_VERSION",
    "Datastore",
    "DatastoreError",
    "TokenizerIdentity",
    "read_arrays",
    "tokenizer_identity",
    "write_arrays",
]
