"""The datastore file: tri-gram and bigram successor tables in our own checksummed format.

Why our own format: it must load fast (memory-mapped arrays, no parsing), be safe to open (no
pickle, nothing executed), and refuse loudly when it does not belong to the model's tokenizer or
was damaged. Layout, all little-endian:

    offset 0   magic b"ADEDSTOR" | u32 format version | u32 0 | u64 header length | 32 B sha256(header)
    offset 56  header: UTF-8 JSON (kind, tokenizer identity, build params, stats, array directory)
    ...        each array's raw bytes, 64-byte aligned; the header holds the data region's sha256

Tables (V = vocabulary size, C = contexts, E = kept successors):

    tri_keys    [C]     uint64   context a * V + b, ascending
    tri_offsets [C + 1] int64    successors of context i are entries offsets[i]:offsets[i + 1]
    tri_totals  [C]     float32  count of the context before pruning (so probabilities stay honest)
    tri_next    [E]     int32    successor token c, most frequent first
    tri_counts  [E]     float32  n(a, b, c)
    bi_offsets  [V + 1] int64    the same for one-token contexts b, indexed by b directly
    bi_totals   [V]     float32
    bi_next     [Eb]    int32
    bi_counts   [Eb]    float32
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "FORMAT_VERSION",
    "DatastoreError",
    "TokenizerIdentity",
    "Datastore",
    "write_arrays",
    "read_arrays",
    "tokenizer_identity",
]

MAGIC = b"ADEDSTOR"
FORMAT_VERSION = 1
_PREAMBLE = struct.Struct("<8sIIQ32s")  # magic, version, reserved, header length, header sha256
_ALIGN = 64
TABLES = ("tri_keys", "tri_offsets", "tri_totals", "tri_next", "tri_counts",
          "bi_offsets", "bi_totals", "bi_next", "bi_counts")  # fmt: skip


class DatastoreError(ValueError):
    """A datastore file that cannot be used, saying why and what to do."""


@dataclass(frozen=True)
class TokenizerIdentity:
    """Which tokenizer a datastore's token ids belong to; the vocabulary hash is what must match."""

    name: str
    vocab_size: int
    vocab_hash: str  # sha256 of the sorted (token, id) pairs

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "vocab_size": self.vocab_size, "vocab_hash": self.vocab_hash}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TokenizerIdentity:
        return cls(str(data["name"]), int(data["vocab_size"]), str(data["vocab_hash"]))


def tokenizer_identity(tokenizer: Any, name: str | None = None) -> TokenizerIdentity:
    """Identity of a Hugging Face tokenizer (or anything with `get_vocab()`)."""
    vocab = tokenizer.get_vocab()  # token string -> id
    digest = hashlib.sha256()
    for token, index in sorted(vocab.items(), key=lambda item: item[1]):
        digest.update(f"{index}\t{token}\n".encode("utf-8", "surrogatepass"))
    vocab_size = max(len(tokenizer), max(vocab.values()) + 1) if vocab else len(tokenizer)
    label = name or getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    return TokenizerIdentity(str(label), int(vocab_size), digest.hexdigest())


# ---------------------------------------------------------------------------- raw container
def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_arrays(path: str | os.PathLike, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
    """Write named arrays and a JSON header atomically (temp file, fsync, rename)."""
    path = Path(path)
    directory = []
    offset = 0
    blobs = []
    for name, array in arrays.items():
        array = np.ascontiguousarray(array)
        blob = array.tobytes()
        directory.append({
            "name": name, "dtype": array.dtype.str, "shape": list(array.shape),
            "offset": offset, "nbytes": len(blob),
        })  # fmt: skip
        padded = -(-len(blob) // _ALIGN) * _ALIGN
        blobs.append(blob + bytes(padded - len(blob)))
        offset += padded
    data_sha = hashlib.sha256()
    for blob in blobs:
        data_sha.update(blob)
    header = json.dumps({**meta, "arrays": directory, "data_bytes": offset, "data_sha256": data_sha.hexdigest()}, sort_keys=True).encode()
    data_start = -(-(_PREAMBLE.size + len(header)) // _ALIGN) * _ALIGN
    preamble = _PREAMBLE.pack(MAGIC, FORMAT_VERSION, 0, len(header), hashlib.sha256(header).digest())
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False) as f:
        try:
            f.write(preamble + header)
            f.write(bytes(data_start - len(preamble) - len(header)))
            for blob in blobs:
                f.write(blob)
            f.flush()
            os.fsync(f.fileno())
            os.chmod(f.name, 0o666 & ~_umask())
        except BaseException:
            os.unlink(f.name)
            raise
    os.replace(f.name, path)


def read_arrays(path: str | os.PathLike, verify: bool = True) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(header, arrays) of a file written by `write_arrays`; arrays are read-only memory maps."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            preamble = f.read(_PREAMBLE.size)
            if len(preamble) < _PREAMBLE.size:
                raise DatastoreError(f"{path}: truncated ({size} bytes), not a complete aded datastore")
            magic, version, _, header_len, header_sha = _PREAMBLE.unpack(preamble)
            if magic != MAGIC:
                raise DatastoreError(f"{path}: not an aded datastore (bad magic bytes)")
            if version != FORMAT_VERSION:
                raise DatastoreError(
                    f"{path}: datastore format version {version}, this aded reads version "
                    f"{FORMAT_VERSION}; rebuild it with `aded datastore build`"
                )
            header = f.read(header_len)
    except OSError as exc:
        raise DatastoreError(f"cannot read datastore {path}: {exc}") from exc
    if len(header) < header_len:
        raise DatastoreError(f"{path}: truncated inside the header ({size} bytes)")
    if hashlib.sha256(header).digest() != header_sha:
        raise DatastoreError(f"{path}: header checksum mismatch, the file is corrupt; rebuild it")
    meta = json.loads(header)
    data_start = -(-(_PREAMBLE.size + header_len) // _ALIGN) * _ALIGN
    directory = meta.pop("arrays")
    end = data_start + int(meta.pop("data_bytes"))
    if size < end:
        raise DatastoreError(f"{path}: truncated: {size} bytes, the header promises {end}")
    if size > end:
        raise DatastoreError(f"{path}: {size - end} unexpected bytes after the data, the file is corrupt")
    data_sha = meta.pop("data_sha256")
    if end == data_start:
        region = np.zeros(0, dtype=np.uint8)
    else:
        region = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start, shape=(end - data_start,))
    if verify and hashlib.sha256(region.data).hexdigest() != data_sha:  # .data: the array's buffer
        raise DatastoreError(f"{path}: data checksum mismatch, the file is corrupt; rebuild it")
    arrays = {}
    for entry in directory:
        dtype, shape = np.dtype(entry["dtype"]), tuple(entry["shape"])
        raw = region[entry["offset"] : entry["offset"] + entry["nbytes"]]
        arrays[entry["name"]] = raw.view(dtype).reshape(shape)  # a read-only view of the map
    return meta, arrays


# ---------------------------------------------------------------------------- the tables
class Datastore:
    """Successor tables of a tokenised corpus: P(c | a, b) pruned to the top-k, and P(c | b)."""

    KIND = "aded-ngram"

    def __init__(self, arrays: Mapping[str, np.ndarray], tokenizer: TokenizerIdentity,
                 params: Mapping[str, Any] | None = None, stats: Mapping[str, Any] | None = None) -> None:  # fmt: skip
        missing = [name for name in TABLES if name not in arrays]
        if missing:
            raise DatastoreError(f"datastore lacks tables {missing}")
        # plain ndarray views of the memory maps: slicing a np.memmap costs a subclass round trip
        self.arrays = {name: np.asarray(array) for name, array in arrays.items()}
        self.tokenizer = tokenizer
        self.params = dict(params or {})
        self.stats = dict(stats or {})
        self.vocab_size = tokenizer.vocab_size
        if len(self.arrays["bi_offsets"]) != self.vocab_size + 1:
            raise DatastoreError(f"bigram table covers {len(self.arrays['bi_offsets']) - 1} tokens, vocabulary has {self.vocab_size}")
        self._tri_keys = np.asarray(self.arrays["tri_keys"], dtype=np.uint64)
        self._tri_offsets = np.asarray(self.arrays["tri_offsets"])
        self._bi_offsets = np.asarray(self.arrays["bi_offsets"])

    @property
    def num_contexts(self) -> int:
        return len(self._tri_keys)

    @property
    def num_entries(self) -> int:
        return len(self.arrays["tri_next"])

    def trigram(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray, float]:
        """(successors [n] int32, counts [n] float32, context total) of context (a, b); empty if unseen."""
        key = np.uint64(a * self.vocab_size + b)  # a Python int would make numpy convert the array
        i = int(np.searchsorted(self._tri_keys, key))
        if i >= len(self._tri_keys) or int(self._tri_keys[i]) != key:
            return _NO_IDS, _NO_COUNTS, 0.0
        lo, hi = int(self._tri_offsets[i]), int(self._tri_offsets[i + 1])
        return self.arrays["tri_next"][lo:hi], self.arrays["tri_counts"][lo:hi], float(self.arrays["tri_totals"][i])

    def bigram(self, b: int) -> tuple[np.ndarray, np.ndarray, float]:
        """(successors, counts, total) of the one-token context b."""
        if not 0 <= b < self.vocab_size:
            return _NO_IDS, _NO_COUNTS, 0.0
        lo, hi = int(self._bi_offsets[b]), int(self._bi_offsets[b + 1])
        return self.arrays["bi_next"][lo:hi], self.arrays["bi_counts"][lo:hi], float(self.arrays["bi_totals"][b])

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> None:
        meta = {"kind": self.KIND, "tokenizer": self.tokenizer.to_json(), "params": self.params, "stats": self.stats}
        write_arrays(path, {name: self.arrays[name] for name in TABLES}, meta)

    @classmethod
    def load(cls, path: str | os.PathLike, expect: TokenizerIdentity | None = None, verify: bool = True) -> Datastore:
        """Open a datastore; with `expect`, refuse one built for another tokenizer."""
        meta, arrays = read_arrays(path, verify=verify)
        if meta.get("kind") != cls.KIND:
            raise DatastoreError(f"{path}: holds {meta.get('kind')!r}, not an n-gram datastore")
        identity = TokenizerIdentity.from_json(meta["tokenizer"])
        if expect is not None and identity.vocab_hash != expect.vocab_hash:
            raise DatastoreError(
                f"{path} was built for tokenizer {identity.name!r} (vocabulary {identity.vocab_hash[:12]}, "
                f"{identity.vocab_size} tokens), but the model's tokenizer is {expect.name!r} "
                f"(vocabulary {expect.vocab_hash[:12]}, {expect.vocab_size} tokens); "
                "build a datastore for this model with `aded datastore build --model ...`"
            )
        return cls(arrays, identity, meta.get("params"), meta.get("stats"))

    def info(self) -> dict[str, Any]:
        return {
            "tokenizer": self.tokenizer.to_json(),
            "params": self.params,
            "stats": self.stats,
            "contexts": self.num_contexts,
            "entries": self.num_entries,
            "bigram_entries": int(len(self.arrays["bi_next"])),
        }


_NO_IDS = np.zeros(0, dtype=np.int32)
_NO_COUNTS = np.zeros(0, dtype=np.float32)
