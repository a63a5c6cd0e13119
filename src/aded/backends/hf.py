"""Runs a Hugging Face causal LM for the decoding loop: prefill, tree verification, cache commit.

The KV cache is preallocated per request (`SlotLayer`): a forward writes its new keys/values into
the next free slots, and committing the accepted path moves at most `len(tree)` rows inside the
buffer and shortens the valid length. Rejected nodes are simply overwritten by the next step, as in
gpt-fast's static cache, so a step never copies the whole cache (transformers' DynamicCache
concatenates on every forward).

Step input: the root (the last committed token, not yet in the cache) followed by the tree's nodes,
at positions `past + offset` (offset 0 for the root, depth for a node). A chain uses the model's own
causal mask; any other tree gets a 4D float additive mask (0 = visible, dtype min = hidden: a boolean
mask is silently mis-read by eager attention).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from aded.backends.base import Prefill, Runner
from aded.backends.kernels import fast_linears, tune_all
from aded.tree import DraftTree

__all__ = ["HFRunner", "HFSequence", "SlotLayer", "as_runner"]


class SlotLayer(DynamicLayer):
    """One layer's keys/values in a buffer that grows by doubling; `keys` is a view of the valid part."""

    def __init__(self, capacity: int = 256) -> None:
        super().__init__()
        self.capacity = max(int(capacity), 16)
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        batch, heads, _, dim = key_states.shape
        self._k = key_states.new_zeros((batch, heads, self.capacity, dim))  # [B, H, cap, D]
        self._v = value_states.new_zeros((batch, heads, self.capacity, value_states.shape[-1]))
        self.is_initialized = True

    def _grow(self, needed: int) -> None:
        capacity = self.capacity
        while capacity < needed:
            capacity *= 2
        k = self._k.new_zeros(self._k.shape[:2] + (capacity,) + self._k.shape[3:])
        v = self._v.new_zeros(self._v.shape[:2] + (capacity,) + self._v.shape[3:])
        k[:, :, : self.length] = self._k[:, :, : self.length]
        v[:, :, : self.length] = self._v[:, :, : self.length]
        self._k, self._v, self.capacity = k, v, capacity

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        if self.length + n > self.capacity:
            self._grow(self.length + n)
        self._k[:, :, self.length : self.length + n] = key_states
        self._v[:, :, self.length : self.length + n] = value_states
        self.length += n
        self._refresh()
        return self.keys, self.values

    def _refresh(self) -> None:
        self.keys = self._k[:, :, : self.length]
        self.values = self._v[:, :, : self.length]

    def get_seq_length(self) -> int:
        return self.length

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative count of positions to remove")
        self.length = max(0, self.length + tokens_to_remove)
        if self.is_initialized:
            self._refresh()

    def keep_rows(self, start: int, rows: torch.Tensor) -> None:
        """Keep rows `start + rows[j]` at `start + j` and drop everything after them."""
        n = rows.numel()
        if n and not torch.equal(rows, torch.arange(n, device=rows.device)):
            src = rows + start
            self._k[:, :, start : start + n] = self._k.index_select(2, src)
            self._v[:, :, start : start + n] = self._v.index_select(2, src)
        self.length = start + n
        self._refresh()

    def reset(self) -> None:
        """transformers' `Cache.reset()` calls this on every layer: without it the base would drop
        the tensors but keep `length`, so the cache would claim positions it no longer holds."""
        self.length = 0
        if self.is_initialized:
            self._refresh()


@dataclass
class HFSequence:
    """Per-request model state: the KV cache and how many positions it holds."""

    cache: DynamicCache
    layers: list[SlotLayer]
    step_start: int = 0  # cache length before the last verify (where its root was written)

    @property
    def past_len(self) -> int:
        return self.layers[0].length


class HFRunner:
    """The model side of the loop (the `Runner` protocol of backends/base.py) for a transformers
    model on any torch device; knows token ids and tensors, nothing of drafters or text."""

    backend = "hf"
    max_tree_leaves: int | None = None  # a 4D mask expresses any tree
    max_tree_nodes: int | None = None
    # every prompt runs whole: torch's kernels sum in another order for another batch shape, so
    # cells kept from decoding would differ from a fresh prefill's in the last bits

    def __init__(self, model) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        config = model.config.get_text_config(decoder=True)
        self.vocab_size = int(config.vocab_size)
        self.max_positions = int(getattr(config, "max_position_embeddings", 0) or 1 << 30)
        self._mask_min = torch.finfo(self.dtype).min
        self.eos_token_ids = _configured_eos(model)
        probe = DynamicCache(config=model.config)
        if any(type(layer) is not DynamicLayer for layer in probe.layers):
            kinds = sorted({type(layer).__name__ for layer in probe.layers})
            raise ValueError(
                f"{type(model).__name__} uses cache layers {kinds}; only full-attention models are supported"
            )
        self._num_layers = len(probe.layers)
        self._decoder, self._head = self._split_head(model)
        if self._decoder is not None:  # a view of it, with kernels for few rows; `model` is untouched
            self._decoder = fast_linears(self._decoder)
            tune_all(self._decoder)  # now, not in the first steps of a request (kernels.py)
            if self._head.choice is not None:
                self._head.choice.tune()
        self._cache_arg = _cache_argument(self._decoder if self._decoder is not None else model)

    @staticmethod
    def _split_head(model):
        """(decoder, FastHead) when the model's logits are exactly its head applied to the
        decoder's last hidden states (checked on a few tokens), else (None, None): then the
        model's own forward computes logits."""
        from aded.backends.head import FastHead

        get_decoder = getattr(model, "get_decoder", None)
        linear = model.get_output_embeddings()
        if get_decoder is None or not isinstance(linear, torch.nn.Linear):
            return None, None
        decoder = get_decoder()
        head = FastHead(linear)
        probe = torch.tensor([[1, 2, 3, 4]], device=next(model.parameters()).device)
        with torch.inference_mode():
            try:
                expected = model(input_ids=probe).logits[0]
                hidden = decoder(input_ids=probe).last_hidden_state[0]
            except (TypeError, ValueError, RuntimeError, AttributeError):
                return None, None
            got = head(hidden)
        if not torch.allclose(got.float(), expected.float(), rtol=1e-3, atol=1e-3):
            return None, None  # e.g. soft-capped or scaled logits
        return decoder, head

    def _forward(self, seq: HFSequence, last_only: bool = False, **inputs) -> torch.Tensor:
        """Logits [rows, vocab] float32 for the given inputs, extending `seq`'s cache."""
        inputs[self._cache_arg] = seq.cache
        if self._decoder is None:
            out = self.model(**inputs, use_cache=True, logits_to_keep=1 if last_only else 0)
            return out.logits[0].float().cpu()
        hidden = self._decoder(**inputs, use_cache=True).last_hidden_state[0]
        if last_only:
            hidden = hidden[-1:]
        return self._head(hidden).float().cpu()  # [rows, vocab]; .cpu() also synchronises

    def new_sequence(self, capacity: int) -> HFSequence:
        layers = [SlotLayer(capacity) for _ in range(self._num_layers)]
        cache = DynamicCache(config=self.model.config)
        # one list, shared with the sequence; a list[SlotLayer] is not a list of the cache's layer union to mypy
        cache.layers = layers  # type: ignore[assignment]
        return HFSequence(cache, layers)

    @torch.inference_mode()
    def prefill(self, seq: HFSequence, input_ids: Sequence[int]) -> Prefill:
        """Run the prompt whole (nothing is kept across sequences)."""
        ids = torch.tensor([input_ids], dtype=torch.long, device=self.device)  # [1, n]
        return Prefill(self._forward(seq, last_only=True, input_ids=ids)[-1], 0)

    @torch.inference_mode()
    def verify(self, seq: HFSequence, root_id: int, tree: DraftTree) -> torch.Tensor:
        """One forward over root + tree; row 0 = logits after the root, row i+1 after node i.

        Returns [1 + k, vocab] float32 logits.
        """
        past = seq.past_len
        seq.step_start = past
        k = len(tree)
        ids = torch.empty((1, k + 1), dtype=torch.long)  # [1, 1 + k]
        ids[0, 0] = root_id
        if k:
            ids[0, 1:] = torch.tensor(tree.token_ids)
        positions = torch.tensor(tree.position_offsets + past).unsqueeze(0)  # [1, 1 + k]
        mask = None
        if k and not tree.is_chain:
            visible = torch.ones((k + 1, past + k + 1), dtype=torch.bool)  # [1 + k, past + 1 + k]
            visible[:, past:] = torch.tensor(tree.verify_mask)
            mask = torch.zeros(visible.shape, dtype=self.dtype).masked_fill_(~visible, self._mask_min)
            mask = mask[None, None].to(self.device)  # [1, 1, 1 + k, past + 1 + k]
        return self._forward(
            seq,
            input_ids=ids.to(self.device),
            position_ids=positions.to(self.device),
            attention_mask=mask,
        )

    @torch.inference_mode()
    def commit(self, seq: HFSequence, accepted_nodes: Sequence[int]) -> None:
        """After `verify`: keep the root and the accepted path, in order; drop rejected nodes."""
        rows = torch.tensor([0] + [i + 1 for i in accepted_nodes], dtype=torch.long, device=self.device)
        for layer in seq.layers:
            layer.keep_rows(seq.step_start, rows)

    def rewind(self, seq: HFSequence, length: int) -> None:
        for layer in seq.layers:
            layer.crop(min(0, length - layer.length))

    def forget(self, keep: Sequence[int] = ()) -> None:
        pass  # nothing is kept across sequences

    def cost_identity(self) -> str:
        return f"hf|{self.dtype}|{self.device}|threads={torch.get_num_threads()}|torch={torch.__version__}"

    def plain_decoder(self, prompt_lookup: int | None = None, seed: int = 0):
        """transformers' model itself: its `generate` is plain decoding as users run it (prompt
        lookup is a field of its generation config there)."""
        return self.model

    def describe(self) -> dict:
        import transformers

        return {"backend": "hf", "threads": torch.get_num_threads(), "torch": torch.__version__,
                "transformers": transformers.__version__, "device": str(self.device),
                "dtype": str(self.dtype).removeprefix("torch.")}


def _cache_argument(module) -> str:
    """The keyword `module.forward` takes the KV cache under: `cache` in the transformers versions
    that renamed it (where `past_key_values` still works but warns on every call), else
    `past_key_values`. Read from the signature, so each model gets the name it declares."""
    parameters = inspect.signature(module.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _configured_eos(model) -> tuple[int, ...]:
    """The EOS ids of the model's generation config (where transformers' `generate` stops)."""
    value = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(value, int):
        return (value,)
    return tuple(sorted(int(v) for v in value)) if value else ()


def as_runner(model) -> Runner:
    """`model` itself if it is a runner, else a transformers causal LM run by `HFRunner`."""
    return model if isinstance(model, Runner) else HFRunner(model)
