"""Build a datastore from a corpus: tokenise, count tri-grams in chunks, merge, prune to the top-k.

Memory stays bounded whatever the corpus size: documents are tokenised in batches, each chunk of
about `chunk_tokens` tokens is reduced to (key, count) pairs with `np.unique`, and when the pairs
held in memory pass `max_pairs` they are merged and spilled to `num_buckets` files partitioned by
the middle token b. A bucket holds every (a, b, c) and (b, c) of its b's, so each bucket is merged,
pruned and marginalised to bigrams on its own, exactly. Key of a tri-gram: (a * V + b) * V + c,
which fits uint64 for any V below 2.6 million.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from aded.store.corpus import CorpusFile, corpus_files, iter_documents
from aded.store.datastore import Datastore, TokenizerIdentity, tokenizer_identity

__all__ = ["BuildParams", "NgramCounter", "top_k_prune", "build_datastore", "batch_encoder"]

Encoder = Callable[[list[str]], list[Sequence[int]]]


@dataclass(frozen=True)
class BuildParams:
    top_k: int = 12  # successors kept per two-token context (the paper's code keeps 12)
    bigram_top_k: int = 12  # successors kept per one-token context (the back-off)
    min_count: int = 1  # contexts seen fewer times are dropped (shrinks big datastores)
    chunk_tokens: int = 1 << 21  # tokens counted per chunk
    max_pairs: int = 1 << 24  # (key, count) pairs held in memory before spilling (~200 MB)
    num_buckets: int = 16

    def __post_init__(self) -> None:
        for name in ("top_k", "bigram_top_k", "min_count", "chunk_tokens", "max_pairs", "num_buckets"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


def top_k_prune(groups: np.ndarray, items: np.ndarray, counts: np.ndarray, k: int):
    """Keep the k largest counts per group.

    Inputs are parallel [n] arrays with distinct (group, item) pairs. Returns (group keys [g],
    offsets [g + 1], group totals before pruning [g], kept items, kept counts), groups ascending,
    items by decreasing count (ties: smaller item id first).
    """
    order = np.lexsort((items, -counts, groups))
    groups, items, counts = groups[order], items[order], counts[order]
    starts = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]]) if len(groups) else np.zeros(0, np.int64)
    totals = np.add.reduceat(counts, starts) if len(groups) else np.zeros(0, counts.dtype)
    sizes = np.diff(np.r_[starts, len(groups)])
    rank = np.arange(len(groups)) - np.repeat(starts, sizes)
    keep = rank < k
    kept = np.minimum(sizes, k)
    offsets = np.zeros(len(starts) + 1, dtype=np.int64)
    np.cumsum(kept, out=offsets[1:])
    return groups[starts], offsets, totals, items[keep], counts[keep]


def _merge(keys: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    unique, inverse = np.unique(keys, return_inverse=True)
    return unique, np.bincount(inverse, weights=counts, minlength=len(unique)).astype(np.int64)


class NgramCounter:
    """Streaming tri-gram counter with bounded memory; `finish()` gives the pruned tables."""

    def __init__(self, vocab_size: int, params: BuildParams = BuildParams(), workdir: str | None = None) -> None:
        if not 1 <= vocab_size < 2_600_000:
            raise ValueError(f"vocab_size must be in [1, 2.6M), got {vocab_size}")
        self.V = vocab_size
        self.params = params
        self.num_tokens = 0
        self.num_documents = 0
        self._chunk: list[np.ndarray] = []
        self._chunk_len = 0
        self._pairs: list[tuple[np.ndarray, np.ndarray]] = []
        self._num_pairs = 0
        self._workdir = workdir
        self._spill: tempfile.TemporaryDirectory | None = None

    def add(self, token_ids: Sequence[int]) -> None:
        """Count one document (tri-grams never span two documents)."""
        ids = np.asarray(token_ids, dtype=np.int64)
        if len(ids) and (ids.min() < 0 or ids.max() >= self.V):
            raise ValueError(f"token ids must lie in [0, {self.V})")
        self.num_tokens += len(ids)
        self.num_documents += 1
        if len(ids) < 3:
            return
        self._chunk.append(ids)
        self._chunk.append(np.array([-1], dtype=np.int64))  # document separator
        self._chunk_len += len(ids) + 1
        if self._chunk_len >= self.params.chunk_tokens:
            self._count_chunk()

    def _count_chunk(self) -> None:
        if not self._chunk:
            return
        tokens = np.concatenate(self._chunk)  # [n] with -1 between documents
        self._chunk, self._chunk_len = [], 0
        a, b, c = tokens[:-2], tokens[1:-1], tokens[2:]
        valid = (a >= 0) & (b >= 0) & (c >= 0)
        keys = ((a[valid] * self.V + b[valid]) * self.V + c[valid]).astype(np.uint64)
        unique, counts = np.unique(keys, return_counts=True)
        self._pairs.append((unique, counts.astype(np.int64)))
        self._num_pairs += len(unique)
        if self._num_pairs > self.params.max_pairs:
            keys, counts = _merge(*map(np.concatenate, zip(*self._pairs)))
            self._pairs, self._num_pairs = [(keys, counts)], len(keys)
            if self._num_pairs > self.params.max_pairs // 2:
                self._spill_pairs()

    def _spill_pairs(self) -> None:
        if self._spill is None:
            self._spill = tempfile.TemporaryDirectory(prefix="aded-build-", dir=self._workdir)
        keys, counts = map(np.concatenate, zip(*self._pairs))
        bucket = ((keys // np.uint64(self.V)) % np.uint64(self.V)) % np.uint64(self.params.num_buckets)
        for index in range(self.params.num_buckets):
            mine = bucket == index
            with open(Path(self._spill.name) / f"{index}.keys", "ab") as f:
                f.write(keys[mine].tobytes())
            with open(Path(self._spill.name) / f"{index}.counts", "ab") as f:
                f.write(counts[mine].tobytes())
        self._pairs, self._num_pairs = [], 0

    def _buckets(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        self._count_chunk()
        if self._spill is None:
            if self._pairs:
                keys, counts = map(np.concatenate, zip(*self._pairs))
                yield keys, counts
            return
        if self._pairs:
            self._spill_pairs()
        for index in range(self.params.num_buckets):
            folder = Path(self._spill.name)
            if (folder / f"{index}.keys").exists():
                yield (np.fromfile(folder / f"{index}.keys", dtype=np.uint64),
                       np.fromfile(folder / f"{index}.counts", dtype=np.int64))  # fmt: skip

    def finish(self) -> dict[str, np.ndarray]:
        """Merge, prune and marginalise: the datastore tables (see `aded.store.datastore`)."""
        V, p = np.uint64(self.V), self.params
        tri_parts, bi_parts = [], []
        for keys, counts in self._buckets():
            keys, counts = _merge(keys, counts)
            contexts, nexts = keys // V, (keys % V).astype(np.int64)
            bi_keys, bi_counts = _merge((contexts % V) * V + nexts.astype(np.uint64), counts)
            bi_parts.append(top_k_prune((bi_keys // V).astype(np.int64), (bi_keys % V).astype(np.int64), bi_counts, p.bigram_top_k))
            tri_parts.append(top_k_prune(contexts, nexts, counts, p.top_k))
        if self._spill is not None:
            self._spill.cleanup()
            self._spill = None
        tri = _concat_groups(tri_parts, p.min_count)
        bi_groups, bi_offsets, bi_totals, bi_next, bi_counts = _concat_groups(bi_parts, 1)
        dense_sizes = np.zeros(self.V, dtype=np.int64)
        dense_sizes[bi_groups] = np.diff(bi_offsets)
        dense_totals = np.zeros(self.V, dtype=np.float32)
        dense_totals[bi_groups] = bi_totals
        dense_offsets = np.zeros(self.V + 1, dtype=np.int64)
        np.cumsum(dense_sizes, out=dense_offsets[1:])
        return {
            "tri_keys": tri[0].astype(np.uint64), "tri_offsets": tri[1],
            "tri_totals": tri[2].astype(np.float32), "tri_next": tri[3].astype(np.int32),
            "tri_counts": tri[4].astype(np.float32), "bi_offsets": dense_offsets,
            "bi_totals": dense_totals, "bi_next": bi_next.astype(np.int32), "bi_counts": bi_counts.astype(np.float32),
        }  # fmt: skip


def _concat_groups(parts: list, min_count: int):
    """Join per-bucket pruned groups into one table sorted by group key, dropping rare groups."""
    if not parts:
        empty = np.zeros(0, np.int64)
        return empty.astype(np.uint64), np.zeros(1, np.int64), empty, empty, empty
    groups = np.concatenate([part[0] for part in parts])
    totals = np.concatenate([part[2] for part in parts])
    sizes = np.concatenate([np.diff(part[1]) for part in parts])
    items = np.concatenate([part[3] for part in parts])
    counts = np.concatenate([part[4] for part in parts])
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    order = np.argsort(groups, kind="stable")
    order = order[totals[order] >= min_count]
    sizes, starts = sizes[order], starts[order]
    entry = np.concatenate([np.arange(s, s + n) for s, n in zip(starts, sizes)]) if len(order) else np.zeros(0, np.int64)
    offsets = np.zeros(len(order) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    return groups[order], offsets, totals[order], items[entry], counts[entry]


def batch_encoder(tokenizer: Any) -> Encoder:
    """Fast batch tokenisation without special tokens (the Rust backend when there is one)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return lambda texts: [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    return lambda texts: [tokenizer.encode(t, add_special_tokens=False) for t in texts]


def build_datastore(
    paths: Iterable[str | Path] | Sequence[CorpusFile],
    tokenizer: Any,
    out: str | Path,
    params: BuildParams = BuildParams(),
    identity: TokenizerIdentity | None = None,
    text_field: str = "text",
    progress: bool = True,
    batch_docs: int = 512,
) -> Datastore:
    """Tokenise the corpus at `paths`, count, prune and write the datastore to `out` atomically."""
    from aded.progress import console

    identity = identity or tokenizer_identity(tokenizer)
    items = list(paths)
    files = [p for p in items if isinstance(p, CorpusFile)]
    if len(files) < len(items):  # paths to find the files under
        files = corpus_files(p.path if isinstance(p, CorpusFile) else p for p in items)
    encode = batch_encoder(tokenizer)
    counter = NgramCounter(identity.vocab_size, params)
    start = time.perf_counter()
    with _Progress(sum(f.size for f in files), progress and console.is_terminal) as bar:
        for file in files:
            batch: list[str] = []
            for document in iter_documents(file, text_field):
                batch.append(document)
                if len(batch) >= batch_docs:
                    bar.tokens(_count(counter, encode, batch))
                    batch = []
            bar.tokens(_count(counter, encode, batch))
            bar.file_done(file.size)
    tables = counter.finish()
    seconds = time.perf_counter() - start
    stats = {"tokens": counter.num_tokens, "documents": counter.num_documents, "files": len(files),
             "build_seconds": round(seconds, 2), "sources": _roots(f.path.parent for f in files)}  # fmt: skip
    store = Datastore(tables, identity, asdict(params), stats)
    store.save(out)
    if progress:
        console.print(f"[dim]datastore {out}: {counter.num_tokens:,} tokens in {seconds:.1f} s "
                      f"({counter.num_tokens / max(seconds, 1e-9):,.0f} tokens/s), {store.num_contexts:,} contexts[/dim]")  # fmt: skip
    return store


def _roots(folders: Iterable[Path]) -> list[str]:
    """The outermost folders among `folders` (what a corpus was built from, briefly)."""
    roots: list[Path] = []
    for folder in sorted({Path(f).resolve() for f in folders}, key=lambda p: len(p.parts)):
        if not any(folder.is_relative_to(root) for root in roots):
            roots.append(folder)
    return sorted(str(root) for root in roots)


def _count(counter: NgramCounter, encode: Encoder, batch: list[str]) -> int:
    if not batch:
        return 0
    total = 0
    for ids in encode(batch):
        counter.add(ids)
        total += len(ids)
    return total


class _Progress:
    """A rich bar over corpus bytes, with tokens counted and tokens/s; silent when not a terminal."""

    def __init__(self, total_bytes: int, enabled: bool) -> None:
        self.enabled = enabled
        self.num_tokens = 0
        self.done_bytes = 0
        self.start = time.perf_counter()
        if enabled:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            from aded.progress import console

            self._bar = Progress(TextColumn("counting tri-grams"), BarColumn(), TextColumn("{task.fields[info]}"),
                                 TimeRemainingColumn(), console=console, transient=True)  # fmt: skip
            self._task = self._bar.add_task("count", total=max(total_bytes, 1), info="")

    def __enter__(self) -> _Progress:
        if self.enabled:
            self._bar.__enter__()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if self.enabled:
            self._bar.__exit__(exc_type, exc, traceback)

    def tokens(self, n: int) -> None:
        self.num_tokens += n
        if self.enabled:
            rate = self.num_tokens / max(time.perf_counter() - self.start, 1e-9)
            self._bar.update(self._task, info=f"{self.num_tokens:,} tokens, {rate:,.0f} tok/s")

    def file_done(self, size: int) -> None:
        self.done_bytes += size
        if self.enabled:
            self._bar.update(self._task, completed=self.done_bytes)
