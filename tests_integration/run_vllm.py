"""One vLLM (CPU) engine run in its own process: greedy outputs, timing and speculative metrics as JSON.

    python run_vllm.py '{"model": DIR, "prompts": [...], "max_tokens": 64, "method": "aded"|"ngram"|null,
                         "k": 4, "tp": 1, "drafter": "aded"}'

A fresh process per engine: vLLM does not give back its workers and memory reliably in-process.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main(options: dict) -> dict:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache: plenty for these prompts
    if options.get("tp", 1) > 1:  # one NUMA node here: bind each rank's threads to its own core by hand
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(i % (os.cpu_count() or 1)) for i in range(options["tp"])))
    from vllm import LLM, SamplingParams

    from aded.integrations.vllm import spec_decode_counters

    speculative = None
    if options.get("method") == "aded":
        os.environ["ADED_VLLM_DRAFTER"] = options.get("drafter") or ""
        speculative = {"method": "custom_class", "model": "aded.integrations.vllm.AdedProposer",
                       "num_speculative_tokens": options["k"]}  # fmt: skip
    elif options.get("method") == "ngram":
        speculative = {"method": "ngram", "num_speculative_tokens": options["k"],
                       "prompt_lookup_max": 4, "prompt_lookup_min": 1}  # fmt: skip
    llm = LLM(
        model=options["model"],
        dtype="float32",
        max_model_len=options.get("max_model_len", 1024),
        tensor_parallel_size=options.get("tp", 1),
        distributed_executor_backend="mp" if options.get("tp", 1) > 1 else None,
        speculative_config=speculative,
        enforce_eager=True,
        # on the CPU backend this is the share of RAM reserved; the machine is shared, keep it small
        gpu_memory_utilization=options.get("memory", 0.15),
        disable_log_stats=False,
        seed=0,
    )
    params = SamplingParams(temperature=0.0, max_tokens=options["max_tokens"], ignore_eos=options.get("ignore_eos", False))
    llm.generate(options["prompts"][:1], SamplingParams(temperature=0.0, max_tokens=4))  # warm-up
    before = spec_decode_counters(llm)
    start = time.perf_counter()
    outputs = llm.generate(options["prompts"], params)
    seconds = time.perf_counter() - start
    after = spec_decode_counters(llm)
    spec = {name: after.get(name, 0) - before.get(name, 0) for name in after}
    num_generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {
        "token_ids": [list(o.outputs[0].token_ids) for o in outputs],
        "texts": [o.outputs[0].text for o in outputs],
        "seconds": seconds,
        "tokens_per_s": num_generated / seconds,
        "num_generated": num_generated,
        "num_drafts": spec.get("vllm:spec_decode_num_drafts", 0),
        "num_draft_tokens": spec.get("vllm:spec_decode_num_draft_tokens", 0),
        "num_accepted_tokens": spec.get("vllm:spec_decode_num_accepted_tokens", 0),
    }


if __name__ == "__main__":
    result = main(json.loads(sys.argv[1]))
    print("ADED-RESULT " + json.dumps(result))
