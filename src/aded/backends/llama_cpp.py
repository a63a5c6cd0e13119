"""Runs a GGUF file in llama.cpp (through llama-cpp-python's C API) for the decoding loop.

The file is used as it is (quantised weights, llama.cpp's kernels); nothing is de-quantised.

A draft tree is verified in one `llama_decode` with sequence ids instead of an attention mask
(method.md section 8): every root-to-leaf path is one sequence, a node carries the ids of all the
leaves below it and the root carries them all, at positions `past + depth`. The committed past
lives in sequence 0 and is shared with the tree's other sequences before the step (`seq_cp`; with
a unified KV buffer that only adds ids to the cells). After acceptance one sequence that holds the
accepted path is kept (`seq_keep`), cut after the path (`seq_rm`) and becomes sequence 0 again:
nothing is copied, rejected cells are freed.

The context is set up as llama-cpp-python's `Llama(model_path=...)` sets up its own (flash
attention off, f16 KV cache, the same batch sizes), so plain decoding through this runner is
llama.cpp's own greedy decoding of the file.

Exactness. A verification row must equal what one-token decoding computes, bit for bit: quantised
models re-quantise activations before every matrix product, so a rounding-level difference grows
to ~0.5 in the logits and flips near-ties. Two things guarantee it:
- llama.cpp built without llamafile's sgemm (`GGML_LLAMAFILE=OFF`, as scripts/setup.sh does): its
  batched kernels sum in another order than the one-row kernels; ggml's own kernels compute every
  output element the same way whatever the batch size.
- the accepted path sits in consecutive KV cells, as one-token decoding would have put it: the
  attention sums run over cells in SIMD lanes, and a hole (a rejected sibling's cell) shifts them.
  A chain keeps that by construction. A node on any branch but the first sees its context at other
  cell offsets, so trees wider than one path (`max_leaves > 1`) are lossless only up to such
  rounding, and the default verifies one path: the best-scoring chain of the drafter's tree, which
  is also what pays on a CPU where each extra node costs ~60% of a step.
Batch rows leave the one-row kernels in two places. Weights llama.cpp repacks for this CPU at
load (Q4_0, Q4_K, IQ4_NL on AVX2; `repack=True`, llama.cpp's default) run four activation rows at
a time through another kernel, so only batches of up to three rows match one-token decoding. K-quant
and IQ weights that are not repacked take ggml's tiled matmul from eight rows on (the
`ggml_tiled_min_batch` gate; `GGML_CPU_TILED_MM=0` in the environment turns it off for the process),
so batches of up to seven rows match. Which batch sizes are exact is not guessed from types: the
runner measures it when it loads (a chain verified in one batch against the same tokens decoded one
at a time, compared bit for bit) and limits verified chains to the longest exact one
(`max_tree_nodes`; 0 means plain decoding only). `choose_repack` picks the setting that predicts
the faster decoding on this file and machine. `max_nodes=None` is the opt-in mode on llama.cpp's own
terms (`numerics="batched"` in `load_runner`): chains of any length through llama.cpp's fastest
batched kernels, as llama-server verifies; each emitted token is still the model's own greedy choice
(or an exact sample) under the batch's arithmetic, never a drafter's guess, but near-ties may fall
otherwise than in one-token decoding, so the output may differ from plain decoding's.

A conversation's next turn keeps the cells of the prefix its prompt shares with what the previous
sequence left, as llama-cpp-python's `generate` and llama-server's prompt cache keep theirs, and
prefills the rest in the same `n_batch` chunks. The decoding loop leaves a finished sequence holding
exactly what plain decoding would have cached (the prompt and every emitted token but the last), and
verified rows are the one-row bits, so the cells equal those of llama.cpp's plain decoding run
through the same turns, and so does every later turn's output. (Whether a resumed prompt also gives
the bits of a prefill from scratch depends on the kernels: on repacked or tiled weights it does not,
for llama.cpp itself no more than for aded; `reuse_prefix=False` prefills every prompt whole.)

Slots: several requests in one context (`slots=N`, what llama-server calls `-np N`). Each slot is
one llama.cpp sequence (id = the slot's number) with its own prompt cache (the prefix reuse above,
per slot), and `decode_parts` runs rows of several slots in one `llama_decode`, each slot's rows
under its own sequence id; `aded.backends.gather` lets concurrent requests share steps that way.
The context then uses llama.cpp's non-unified KV cache (`kv_unified = False`): every sequence has
its own cell buffer ("stream"), so a slot's cells sit at the same offsets as in a one-slot context
and its rows attend over exactly the cells, in exactly the SIMD lanes, of solo decoding. Measured on
the default model (`python benchmarks/concurrency.py --exactness` repeats it): with one unified
buffer, client A's one-token rows beside client B's rows or cells equal A's solo rows bit for bit
in only 2 to 13 of 24 steps (max |diff| 0.79 to 0.93 in the logits: B's cells interleave with A's
and shift the lanes of A's attention sums); non-unified, 24 of 24 in every arrangement (and, in
tests/test_gather.py, chains beside other slots' prompt chunks). Other streams' rows only add
masked cells (exact zeros) and batch rows, which ggml computes row by row (see "Exactness").
What that costs: llama.cpp splits a non-unified batch into micro-batches that take the same number
of rows from each of a run of consecutive sequence ids (`split_equal`), so rows of slots 0-3 with
1, 3, 3 and 6 rows run as three graph computations (4x1, 3x2, 1x3 rows), and slots 0 and 2 without
1 as two (`Gather` prefers low slots where prefix reuse does not decide); and every slot's rows
attend over as many cells as the longest slot in the micro-batch holds (masked for the others).
A token cannot belong to two streams, so slots verify chains (`max_leaves=1`).
`n_ctx` stays what one sequence holds: each slot has `n_ctx` cells (llama-server's `-c` is split
among its slots instead), so a request's limits do not depend on how many slots the server runs
and a slot's attention spans what a one-slot context's would; the KV memory is `slots` times as
large (the default model: ~23 KB a position, 750 MB for 4 slots of 8192).
"""

from __future__ import annotations

import ctypes
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aded.backends.base import Prefill, physical_cores
from aded.backends.tokens import common_prefix
from aded.tree import DraftTree

__all__ = ["LlamaCppRunner", "LlamaCppError", "LlamaSequence", "BatchPart", "llama_cpp_available",
           "tree_sequences", "cpu_features", "llama_build_identity", "tiled_matmul_enabled"]

#: root-to-leaf paths per verification; the budget prunes wider trees to this (see "Exactness")
DEFAULT_MAX_LEAVES = 1
#: chain length probed for exact batch verification when a runner loads
PROBE_NODES = 32
#: the probe results cached per file, build and settings; a new version re-probes
PROBE_VERSION = "v1"


class LlamaCppError(RuntimeError):
    """llama.cpp refused a file or a step; the message says which and why."""


def llama_cpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


_LOG_CALLBACK = None


def _quiet(llama_cpp) -> None:
    """Route llama.cpp's log lines to nowhere (once per process); errors surface as exceptions."""
    global _LOG_CALLBACK
    if _LOG_CALLBACK is None:
        _LOG_CALLBACK = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
        llama_cpp.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()


def cpu_features() -> str:
    """The instruction sets this build of llama.cpp computes with, e.g. `AVX2+FMA+F16C`."""
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode("utf-8", "replace")  # "CPU : SSE3 = 1 | ..."
    return "+".join(re.findall(r"(\w+) = 1\b", info)) or "unknown"


def tiled_matmul_enabled() -> bool:
    """llama.cpp's tiled K-quant matmul (batches of eight rows and more), as ggml reads its switch:
    on unless `GGML_CPU_TILED_MM` is set to a number that is 0 (read once per process)."""
    value = os.environ.get("GGML_CPU_TILED_MM")
    if value is None:
        return True
    digits = re.match(r"\s*[+-]?\d+", value)
    return digits is not None and int(digits.group()) != 0


def llama_build_identity(threads: int | None = None) -> str:
    """What kernels and their costs depend on besides the file and the context: the version, the
    instruction sets (an AVX-512 wheel of the same version has another t(k) and its own exact
    batches), the threads, and the tiled-matmul switch (named only when off, so what was cached
    before it was known stays valid)."""
    import llama_cpp

    threads = int(threads or physical_cores())
    tiled = "" if tiled_matmul_enabled() else "|tiled=0"
    return f"llama.cpp|{llama_cpp.__version__}|{cpu_features()}|threads={threads}{tiled}"


def tree_sequences(tree: DraftTree) -> tuple[list[list[int]], list[int]]:
    """Sequence ids per node (the leaves below it, numbered 0..L-1 in tree order) and, per node,
    the one sequence kept when that node ends the accepted path (its first leaf)."""
    k = len(tree)
    parents = tree.parents.tolist()
    has_child = [False] * k
    for parent in parents:
        if parent >= 0:
            has_child[parent] = True
    seqs: list[list[int]] = [[] for _ in range(k)]
    leaf = 0
    for i in range(k):
        if not has_child[i]:
            seqs[i].append(leaf)
            leaf += 1
    for i in range(k - 1, -1, -1):  # children come after parents: fold leaves upward
        parent = parents[i]
        if parent >= 0:
            seqs[parent].extend(seqs[i])
    for ids in seqs:
        ids.sort()
    return seqs, [ids[0] for ids in seqs]


@dataclass
class LlamaSequence:
    """Per-request state: which slot it lives in, how many positions that slot's sequence holds,
    and the last step's layout."""

    past_len: int = 0
    step_past: int = 0
    step_keep: list[int] | None = None  # per tree node, the sequence to keep if the path ends there
    step_width: int = 1
    step_tokens: list[int] | None = None  # the root and the tree's tokens of the last verification
    slot: int = 0


@dataclass
class BatchPart:
    """One sequence's rows for a `llama_decode` that may carry other slots' rows too.

    `prefill` rows become the slot's cached prompt as soon as they are decoded; verification rows
    wait for `commit`. `logits` flags the rows whose logits come back, in order."""

    seq: LlamaSequence
    tokens: list[int]
    positions: list[int]
    logits: list[bool]
    seq_ids: list[list[int]] | None = None  # per row (a tree's paths); None: the slot's sequence
    prefill: bool = False
    what: str = ""  # for error messages


class LlamaCppRunner:
    """The `Runner` protocol (backends/base.py) over a llama.cpp context."""

    backend = "llama.cpp"

    def __init__(self, path: str | os.PathLike, n_ctx: int | None = None, n_threads: int | None = None,
                 n_batch: int = 512, max_leaves: int = DEFAULT_MAX_LEAVES,
                 max_nodes: int | None = -1, reuse_prefix: bool = True, repack: bool = True,
                 slots: int = 1) -> None:
        """`max_nodes`: the most draft nodes one verification may carry; -1 (the default) measures
        the longest chain llama.cpp verifies exactly on this file and machine, None allows any.
        `reuse_prefix`: start a sequence from the cells of the prefix it shares with the previous
        one, as llama.cpp's own front ends do (False: every prompt is prefilled whole).
        `repack`: let llama.cpp repack weights for this CPU (`use_extra_bufts`, its default).
        `slots`: independent sequences in one context, each with its own prompt cache and `n_ctx`
        positions (see "Slots" in the module's doc; 1 is a one-request runner, as it always was).
        `new_sequence(capacity, slot=s)` starts a request in slot `s`; `decode_parts` runs rows of
        several slots in one `llama_decode`."""
        try:
            import llama_cpp
        except ImportError as exc:
            raise LlamaCppError(
                "the llama.cpp backend needs llama-cpp-python (bash scripts/setup.sh builds it; "
                f"or use --backend hf): {exc}") from exc
        self._lib = llama_cpp
        _quiet(llama_cpp)
        self.path = Path(path)
        if not self.path.is_file():
            raise LlamaCppError(f"{self.path} is not a file")
        if not 1 <= max_leaves <= 256:
            raise ValueError(f"max_leaves must be in [1, 256], got {max_leaves}")
        if not 1 <= int(slots) <= 256:
            raise ValueError(f"slots must be in [1, 256], got {slots}")
        if slots > 1 and max_leaves != 1:
            raise ValueError("a runner with several slots verifies chains (max_leaves=1): each slot's "
                             "cells live in their own KV stream, which tree branches cannot share")
        #: independent sequences (requests) this context holds at once
        self.slots = int(slots)
        self.n_threads = int(n_threads or physical_cores())
        # llama.cpp handles (ctypes objects of the untyped llama_cpp module), set up below
        self._model: Any = None
        self._ctx: Any = None
        self._batch: Any = None
        #: new sequences keep the prefix they share with the previous one (see the module's doc)
        self.reuse_prefix = bool(reuse_prefix)
        #: per slot, the token ids held at positions 0, 1, ... of its sequence (its prompt cache)
        self._slot_tokens: list[list[int]] = [[] for _ in range(self.slots)]
        self.repack = bool(repack)
        model_params = llama_cpp.llama_model_default_params()
        model_params.use_extra_bufts = self.repack
        self._model = llama_cpp.llama_model_load_from_file(str(self.path).encode(), model_params)
        if not self._model:
            raise LlamaCppError(f"llama.cpp cannot load {self.path}: not a GGUF model it supports, "
                                "or a damaged file")
        try:
            self._setup(n_ctx, n_batch, max_leaves)
            self.max_tree_nodes: int | None = None
            if max_nodes == -1:
                max_nodes = self._cached_probe(f"probe={PROBE_NODES}", self._exact_chain_nodes,
                                               lambda v: v is None or isinstance(v, int))
            self.max_tree_nodes = max_nodes
            self.forget()  # the probe's cells are no one's prefix
        except BaseException:
            self.close()
            raise

    def _setup(self, n_ctx: int | None, n_batch: int, max_leaves: int) -> None:
        lib = self._lib
        self._vocab = lib.llama_model_get_vocab(self._model)
        self.vocab_size = int(lib.llama_vocab_n_tokens(self._vocab))
        train_ctx = int(lib.llama_model_n_ctx_train(self._model)) or 4096
        self.n_ctx = int(n_ctx or min(train_ctx, 8192))
        if self.n_ctx < 16:
            raise ValueError(f"n_ctx must be at least 16, got {self.n_ctx}")
        self.n_batch = int(min(n_batch, self.n_ctx))
        params = lib.llama_context_default_params()
        params.n_ctx = self.n_ctx
        params.n_batch = self.n_batch
        params.n_ubatch = self.n_batch
        params.n_seq_max = max_leaves
        # trees: one cell buffer shared by all sequences, so seq_cp only adds ids; a chain needs
        # one sequence, set up as Llama(...) sets up its own (a little faster)
        params.kv_unified = max_leaves > 1
        if self.slots > 1:  # one stream of n_ctx cells per slot (llama.cpp pads each to 256)
            params.n_ctx = -(-self.n_ctx // 256) * 256 * self.slots
            params.n_seq_max = self.slots
            params.kv_unified = False
        params.n_threads = self.n_threads
        params.n_threads_batch = self.n_threads
        params.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_DISABLED  # as Llama(...) by default
        params.no_perf = True
        self._ctx = lib.llama_init_from_model(self._model, params)
        if not self._ctx:
            raise LlamaCppError(f"llama.cpp cannot create a context of {self.n_ctx} positions "
                                f"for {self.path} (out of memory?)")
        self.n_ctx = int(lib.llama_n_ctx(self._ctx) if self.slots == 1 else lib.llama_n_ctx_seq(self._ctx))
        self.max_tree_leaves: int = 1 if self.slots > 1 else int(lib.llama_n_seq_max(self._ctx))
        self.max_positions = self.n_ctx
        self._memory: Any = lib.llama_get_memory(self._ctx)
        self._batch = lib.llama_batch_init(self.n_batch, 0, self.max_tree_leaves)
        self.eos_token_ids = self._end_of_generation_ids()

    def _cached_probe(self, name: str, probe, valid) -> Any:
        """`probe()`, remembered per file, build and settings (each takes a second or more)."""
        from aded.fileio import file_sha256, remembered
        from aded.paths import cache_dir

        key = f"{file_sha256(self.path)[:24]}|{self.cost_identity()}|{name}|{PROBE_VERSION}"
        return remembered(cache_dir() / "exact-chains.json", key, probe, valid)

    def _exact_chain_nodes(self, probe: int = PROBE_NODES) -> int | None:
        """The longest chain whose verification rows equal one-token decoding bit for bit (None:
        every chain up to `probe` nodes was exact, so no limit). Run in slot 0."""
        past, chain = self._probe_ids(0, 48, probe)
        seq = self.new_sequence(0)
        self.prefill(seq, past)
        single = []
        for token in [7, *chain]:  # one token at a time, as plain decoding runs
            single.append(self.verify(seq, token, DraftTree.empty())[0])
            self.commit(seq, ())

        def exact(k: int) -> bool:
            self.rewind(seq, len(past))
            rows = self.verify(seq, 7, DraftTree.chain(chain[:k]))
            return all(torch.equal(rows[i], single[i]) for i in range(k + 1))

        if exact(probe):
            return None
        k = 0
        while k < probe and exact(k + 1):
            k += 1
        return k

    def _probe_ids(self, seed: int, *lengths: int) -> list[list[int]]:
        """Random ordinary token ids for the probes, one list per length (the same every run)."""
        rng = np.random.default_rng(seed)
        vocab = min(self.vocab_size, 30000)
        return [rng.integers(100, vocab, n).tolist() for n in lengths]

    def _end_of_generation_ids(self) -> tuple[int, ...]:
        """Every token llama.cpp treats as end of generation (EOS, EOT and the like)."""
        lib = self._lib
        flags = np.fromiter((lib.llama_vocab_is_eog(self._vocab, t) for t in range(self.vocab_size)),
                            dtype=bool, count=self.vocab_size)
        return tuple(int(t) for t in np.flatnonzero(flags))

    # ------------------------------------------------------------------ lifecycle
    # ------------------------------------------------------------------ the same model, elsewhere
    def plain_decoder(self, prompt_lookup: int | None = None, seed: int = 0):
        """llama-cpp-python's own `Llama` on this runner's file, context, threads and weight
        layout: plain decoding as users run it (with its own prompt lookup of `prompt_lookup`
        tokens), the benchmark's baseline."""
        import llama_cpp.llama as high_level
        from llama_cpp import Llama

        options: dict[str, Any] = {}
        if prompt_lookup:
            from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

            # its draft path breaks on prompts longer than n_batch unless the batch holds them
            options = {"draft_model": LlamaPromptLookupDecoding(num_pred_tokens=prompt_lookup)}
        batch = self.n_ctx if prompt_lookup else self.n_batch
        # `Llama` takes no argument for weight repacking; it reads its model parameters from the
        # low-level defaults, so those are what carry this runner's choice while it loads
        defaults = high_level.llama_cpp.llama_model_default_params

        def with_this_layout():
            params = defaults()
            params.use_extra_bufts = self.repack
            return params

        high_level.llama_cpp.llama_model_default_params = with_this_layout
        try:
            return Llama(model_path=str(self.path), n_ctx=self.n_ctx, n_threads=self.n_threads,
                         n_threads_batch=self.n_threads, n_batch=batch, n_ubatch=batch, seed=seed,
                         verbose=False, **options)
        finally:
            high_level.llama_cpp.llama_model_default_params = defaults

    def server_args(self) -> list[str]:
        """`llama-server` options that load this runner's file with its context, threads, batch
        and weight layout (one slot, no flash attention, as this runner decodes)."""
        args = ["-m", str(self.path), "-c", str(self.n_ctx), "-t", str(self.n_threads),
                "-tb", str(self.n_threads), "-b", str(self.n_batch), "-ub", str(self.n_batch),
                "-np", "1", "-fa", "off"]
        return args if self.repack else [*args, "--no-repack"]

    def sibling(self, repack: bool, max_nodes: int | None = -1) -> LlamaCppRunner:
        """Another runner of this file and context settings with another weight layout and chain
        limit (the benchmark's opt-in mode on llama.cpp's own numerics)."""
        return LlamaCppRunner(self.path, n_ctx=self.n_ctx, n_threads=self.n_threads, n_batch=self.n_batch,
                              max_nodes=max_nodes, reuse_prefix=self.reuse_prefix, repack=repack)

    def close(self) -> None:
        lib = self._lib
        if self._batch is not None:
            lib.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            lib.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            lib.llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # ------------------------------------------------------------------ the protocol
    def new_sequence(self, capacity: int, slot: int = 0) -> LlamaSequence:
        """The context's cells are allocated once (`n_ctx` per slot), so only one sequence of a
        slot is live at a time (the slot's previous one is void); its first prefill decides what it
        keeps of the slot's cells."""
        if not 0 <= slot < self.slots:
            raise ValueError(f"slot {slot} does not exist: this runner has {self.slots}")
        return LlamaSequence(slot=int(slot))

    def prefill(self, seq: LlamaSequence, input_ids: Sequence[int]) -> Prefill:
        ids, reused = self.start_prefill(seq, input_ids)
        logits = None
        for start in range(0, len(ids), self.n_batch):
            chunk = ids[start : start + self.n_batch]
            last = start + len(chunk) == len(ids)
            logits = self.decode_parts([self.prefill_part(seq, chunk, last, len(ids))])[0]
        assert logits is not None  # the prompt keeps at least its last token to compute
        return Prefill(logits[0], reused)

    def start_prefill(self, seq: LlamaSequence, input_ids: Sequence[int]) -> tuple[list[int], int]:
        """Check a prompt and keep the cells of the prefix the slot shares with it: (the ids left
        to compute, at least the last one; how many were kept)."""
        ids = [int(t) for t in input_ids]
        if not ids:
            raise ValueError("the prompt must contain at least one token")
        if seq.past_len + len(ids) > self.n_ctx:
            raise ValueError(f"{seq.past_len + len(ids)} positions exceed the context of {self.n_ctx}")
        self._check_ids(ids)
        reused = 0
        if seq.past_len == 0:
            reused = self._keep_prefix(seq, ids)
            ids = ids[reused:]
        return ids, reused

    def prefill_part(self, seq: LlamaSequence, chunk: Sequence[int], last: bool, total: int = 0) -> BatchPart:
        """The rows that compute `chunk` of a prompt after what `seq` holds (`last`: it ends the
        prompt, and the logits of its last row come back)."""
        n = len(chunk)
        return BatchPart(seq, [int(t) for t in chunk], [seq.past_len + j for j in range(n)],
                         [last and j == n - 1 for j in range(n)], None, True,
                         f"prefill of {total or n} tokens")

    def forget(self, keep: Sequence[int] = (), slot: int | None = None) -> None:
        """In `slot` (None: every slot; only while no slot runs a request), keep at most the prefix
        its cached tokens share with `keep`."""
        for s in range(self.slots) if slot is None else (slot,):
            held = self._slot_tokens[s]  # the next prefill keeps at most this prefix, and frees the rest
            del held[self.cached_prefix(keep, s):]

    def cached_prefix(self, ids: Sequence[int], slot: int = 0) -> int:
        """How many leading tokens of `ids` the slot holds computed (a prefill keeps at most all but
        the prompt's last)."""
        return common_prefix(self._slot_tokens[slot], ids)

    def cached_length(self, slot: int = 0) -> int:
        """How many tokens the slot holds computed (its prompt cache)."""
        return len(self._slot_tokens[slot])

    @property
    def _kv_tokens(self) -> list[int]:
        """Slot 0's cached tokens (the one-slot runner's prompt cache)."""
        return self._slot_tokens[0]

    def _keep_prefix(self, seq: LlamaSequence, ids: list[int]) -> int:
        """Keep the cells of the longest prefix `ids` shares with what the slot holds (but the last
        prompt token, whose logits the prefill returns), forget the rest; how many were kept."""
        held = self._slot_tokens[seq.slot]
        limit = min(len(held), len(ids) - 1) if self.reuse_prefix else 0
        keep = min(self.cached_prefix(ids, seq.slot), limit)
        lib, mem = self._lib, self._memory
        if self.slots > 1:  # chains only: the slot's own sequence, in its own stream
            lib.llama_memory_seq_rm(mem, seq.slot, keep, -1)
        elif keep:
            lib.llama_memory_seq_keep(mem, 0)  # a tree step left uncommitted may hold others
            lib.llama_memory_seq_rm(mem, 0, keep, -1)
        else:
            lib.llama_memory_clear(mem, True)
        del held[keep:]
        seq.past_len = keep
        return keep

    def verify(self, seq: LlamaSequence, root_id: int, tree: DraftTree) -> torch.Tensor:
        return self.decode_parts([self.verify_part(seq, root_id, tree)])[0]

    def verify_part(self, seq: LlamaSequence, root_id: int, tree: DraftTree) -> BatchPart:
        """Check a verification and lay it out (sequence ids of a tree's paths, what `commit` will
        keep): the rows `verify` decodes, for `decode_parts` to run beside other slots' rows."""
        k = len(tree)
        past = seq.past_len
        if self.max_tree_nodes is not None and k > self.max_tree_nodes:
            raise ValueError(f"a tree of {k} nodes exceeds the {self.max_tree_nodes} this runner "
                             "verifies exactly")
        if k + 1 > self.n_batch:
            raise ValueError(f"a tree of {k} nodes exceeds the batch of {self.n_batch} tokens")
        if past + k + 1 > self.n_ctx:
            raise ValueError(f"{past} cached positions and {k + 1} new exceed the context of {self.n_ctx}")
        tokens = [int(root_id), *tree.token_ids.tolist()]
        self._check_ids(tokens)
        positions = (tree.position_offsets + past).tolist()
        if tree.is_chain:
            node_seqs, keep, width = None, None, 1
        else:
            per_node, keep = tree_sequences(tree)
            width = max(keep) + 1 if keep else 1
            if width > self.max_tree_leaves:
                raise ValueError(f"a tree with {width} leaves exceeds the {self.max_tree_leaves} "
                                 "sequences of this context")
            node_seqs = [list(range(width)), *per_node]
            for s in range(1, width):  # the committed past, visible to every path
                self._lib.llama_memory_seq_cp(self._memory, 0, s, -1, -1)
        seq.step_past, seq.step_keep, seq.step_width = past, keep, width
        seq.step_tokens = tokens
        return BatchPart(seq, tokens, positions, [True] * len(tokens), node_seqs, False,
                         f"verification of {k} draft nodes")

    def decode_parts(self, parts: Sequence[BatchPart]) -> list[torch.Tensor]:
        """Run the rows of `parts` (of different slots, at most `n_batch` rows in all) in one
        `llama_decode`; per part, [flagged rows, vocab] logits. Prefill rows become their slot's
        cached prompt. Parts go into the batch in slot order, so that llama.cpp's micro-batches
        of a non-unified cache take rows of consecutive sequences together."""
        order = sorted(range(len(parts)), key=lambda i: parts[i].seq.slot)
        rows = sum(len(p.tokens) for p in parts)
        if rows > self.n_batch:
            raise ValueError(f"{rows} rows exceed the batch of {self.n_batch} tokens")
        if len({p.seq.slot for p in parts}) < len(parts):
            raise ValueError("one llama_decode carries at most one part of each slot")
        starts, at = {}, 0
        tokens, positions, flags = [], [], []
        seq_ids: list[list[int]] | None = None
        if self.slots > 1 or any(p.seq_ids is not None for p in parts):
            seq_ids = []
        for i in order:
            part = parts[i]
            starts[i] = at
            at += len(part.tokens)
            tokens += part.tokens
            positions += part.positions
            flags += part.logits
            if seq_ids is not None:
                seq_ids += part.seq_ids if part.seq_ids is not None else [[part.seq.slot]] * len(part.tokens)
        self._fill(tokens, positions, seq_ids, flags)
        what = parts[0].what if len(parts) == 1 else f"batch of {rows} rows from {len(parts)} requests"
        self._decode(what)
        out = []
        for i, part in enumerate(parts):
            out.append(self._logits([starts[i] + j for j, want in enumerate(part.logits) if want]))
            if part.prefill:
                part.seq.past_len += len(part.tokens)
                self._slot_tokens[part.seq.slot].extend(part.tokens)
        return out

    def commit(self, seq: LlamaSequence, accepted_nodes: Sequence[int]) -> None:
        lib, mem = self._lib, self._memory
        kept = len(accepted_nodes)
        end = seq.step_past + 1 + kept  # positions of the past, the root and the accepted path
        if seq.step_width > 1:
            assert seq.step_keep is not None  # verify sets it with a width above 1
            keep = seq.step_keep[accepted_nodes[-1]] if kept else 0
            lib.llama_memory_seq_keep(mem, keep)
            lib.llama_memory_seq_rm(mem, keep, end, -1)
            if keep != 0:
                lib.llama_memory_seq_cp(mem, keep, 0, -1, -1)
                lib.llama_memory_seq_rm(mem, keep, -1, -1)
        else:
            lib.llama_memory_seq_rm(mem, seq.slot, end, -1)
        tokens = seq.step_tokens
        assert tokens is not None, "commit follows a verification"
        held = self._slot_tokens[seq.slot]
        held.append(tokens[0])
        held.extend(tokens[1 + node] for node in accepted_nodes)
        seq.past_len = end
        seq.step_keep, seq.step_width, seq.step_tokens = None, 1, None

    def rewind(self, seq: LlamaSequence, length: int) -> None:
        """Forget positions from `length` on, committed or left by an uncommitted verification."""
        # one slot: every sequence (a tree's paths); several: the slot's own, the others are not its
        self._lib.llama_memory_seq_rm(self._memory, -1 if self.slots == 1 else seq.slot, length, -1)
        seq.past_len = min(seq.past_len, length)
        del self._slot_tokens[seq.slot][length:]
        seq.step_keep, seq.step_width, seq.step_tokens = None, 1, None

    def cost_identity(self) -> str:
        return (f"{llama_build_identity(self.n_threads)}|n_batch={self.n_batch}"
                f"|leaves={self.max_tree_leaves}{'' if self.repack else '|repack=0'}")

    def describe(self) -> dict[str, Any]:
        return {"backend": "llama.cpp", "llama_cpp_python": self._lib.__version__,
                "threads": self.n_threads, "n_ctx": self.n_ctx, "n_batch": self.n_batch,
                "max_tree_leaves": self.max_tree_leaves, "max_tree_nodes": self.max_tree_nodes,
                "repack": self.repack, "slots": self.slots,
                "file": self.path.name, "file_type": self.file_type(), "cpu_features": self.cpu_features()}

    # ------------------------------------------------------------------ llama.cpp specifics
    def cpu_features(self) -> str:
        return cpu_features()

    def file_type(self) -> str:
        buf = ctypes.create_string_buffer(256)
        self._lib.llama_model_desc(self._model, buf, len(buf))
        return buf.value.decode(errors="replace")

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """llama.cpp's own tokenization (tests compare it with the Hugging Face tokenizer's)."""
        data = text.encode()
        size = len(data) + 16
        buf = (self._lib.llama_token * size)()
        n = self._lib.llama_tokenize(self._vocab, data, len(data), buf, size, add_special, parse_special)
        if n < 0:
            buf = (self._lib.llama_token * -n)()
            n = self._lib.llama_tokenize(self._vocab, data, len(data), buf, -n, add_special, parse_special)
        return list(buf[:n])

    def _check_ids(self, ids: Sequence[int]) -> None:
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary of {self.vocab_size}")

    def _fill(self, tokens: list[int], positions: list[int], seq_ids: list[list[int]] | None,
              logits: list[bool]) -> None:
        batch = self._batch
        batch.n_tokens = len(tokens)
        for i, (token, pos, want) in enumerate(zip(tokens, positions, logits)):
            batch.token[i] = token
            batch.pos[i] = pos
            ids = seq_ids[i] if seq_ids is not None else (0,)
            batch.n_seq_id[i] = len(ids)
            row = batch.seq_id[i]
            for j, s in enumerate(ids):
                row[j] = s
            batch.logits[i] = want

    def _decode(self, what: str) -> None:
        code = self._lib.llama_decode(self._ctx, self._batch)
        if code != 0:
            reason = "no room left in the KV cache" if code == 1 else f"error code {code}"
            raise LlamaCppError(f"llama.cpp failed the {what}: {reason}")

    def _logits(self, indices) -> torch.Tensor:
        """[rows, vocab] float32 copies of the logits of these batch indices (-1: the last)."""
        indices = list(indices)
        out = np.empty((len(indices), self.vocab_size), dtype=np.float32)
        row_bytes = out.strides[0]
        for row, i in enumerate(indices):
            ptr = self._lib.llama_get_logits_ith(self._ctx, i)
            if not ptr:
                raise LlamaCppError(f"llama.cpp returned no logits for batch index {i}")
            ctypes.memmove(out.ctypes.data + row * row_bytes, ptr, row_bytes)
        return torch.from_numpy(out)
