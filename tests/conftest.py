"""Tiny, randomly initialised models built in the test, so engine tests run in seconds.

They run in float64: random tiny models have nearly flat logits, and float64 keeps tree
verification and sequential decoding from ever disagreeing on an argmax by rounding.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("ADED_CACHE_DIR", os.path.join(os.path.dirname(__file__), ".cache-tests"))
# tiny models gain nothing from threads, and OpenMP barriers cost milliseconds on a busy machine
torch.set_num_threads(1)


TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512)


def _finish(model, seed_scale: float = 1.0):
    model = model.to(torch.float64).eval()
    if seed_scale != 1.0:
        with torch.no_grad():
            model.lm_head.weight.mul_(seed_scale)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def tiny_llama(vocab_size: int = 96, seed: int = 0, logit_scale: float = 1.0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, tie_word_embeddings=False, **TINY)
    return _finish(LlamaForCausalLM(config), logit_scale)


def tiny_qwen2(vocab_size: int = 96, seed: int = 0, logit_scale: float = 1.0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=vocab_size, tie_word_embeddings=True, **TINY)
    return _finish(Qwen2ForCausalLM(config), logit_scale)


MODEL_FACTORIES = {"llama": tiny_llama, "qwen2": tiny_qwen2}


@pytest.fixture(scope="session", params=sorted(MODEL_FACTORIES))
def tiny_model(request):
    return MODEL_FACTORIES[request.param]()


def hf_greedy(model, prompt_ids, max_new_tokens, eos_token_id=None):
    """transformers' own greedy decoding: the reference every drafter must equal."""
    with torch.inference_mode():
        ids = torch.tensor([prompt_ids])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=eos_token_id, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)


def tiny_tokenizer():
    """A character-level tokenizer (99 ids) with a chat template, built without any download."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for char in [chr(i) for i in range(32, 127)] + ["\n"]:
        vocab[char] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def import_llama_cpp():
    """llama_cpp for the llama.cpp backend's tests. The setup script builds it, so a missing one is
    an import error that fails the run. The one deliberate exception is `ADED_SKIP_LLAMA=1`, the
    setup's documented switch for machines that cannot build llama.cpp: there the backend is absent
    by choice, and its tests skip (module-level, with that reason) instead of failing. CI never sets it."""
    if os.environ.get("ADED_SKIP_LLAMA") == "1":
        pytest.skip("ADED_SKIP_LLAMA=1: setup skipped the llama.cpp backend on purpose",
                    allow_module_level=True)
    import llama_cpp

    return llama_cpp


@pytest.fixture(scope="session")
def tiny_lm():
    """An `Aded` over a tiny Llama whose vocabulary matches `tiny_tokenizer`."""
    from aded.api import Aded

    model = tiny_llama(vocab_size=99, seed=1)
    return Aded(model, tiny_tokenizer(), drafter="pld", budget="off")
