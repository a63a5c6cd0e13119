"""Ray Serve replicas that each run a full vLLM engine with aded's proposer, learning into one store.

This is the deployment `docs/scale.md` describes, small enough for two CPU cores: every replica owns
a vLLM engine whose speculative proposer is `aded.integrations.vllm.AdedProposer`; the proposers
(in each engine's core process) find the shared-state actor by the name in `ADED_VLLM_SHARED`.

vLLM calls the proposer only while it decodes, and a finished request is folded into learned state
when its row is next replaced. So each call ends with a short request: it retires the real one
and gives the proposer's background exchange (every `ADED_VLLM_SHARED_INTERVAL` s) steps in which
to send what was learned, and a call starts with one, to pull what the other replica sent.
"""

from __future__ import annotations

import os
import time

from ray import serve

from aded.integrations.vllm import spec_decode_counters

SHARED_NAME = "aded-integration-engines"
FILLER = "List the days of the week, one per line."


@serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 0.5})
class EngineReplica:
    def __init__(self, model_dir: str, k: int = 4) -> None:
        os.environ["ADED_VLLM_SHARED"] = SHARED_NAME
        os.environ["ADED_VLLM_SHARED_INTERVAL"] = "0.2"
        os.environ["ADED_VLLM_DRAFTER"] = "aded"
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        from vllm import LLM, SamplingParams

        self._params = SamplingParams
        self.llm = LLM(model=model_dir, dtype="float32", max_model_len=1024, enforce_eager=True,
                       speculative_config={"method": "custom_class", "num_speculative_tokens": k,
                                           "model": "aded.integrations.vllm.AdedProposer"},
                       gpu_memory_utilization=0.1, disable_log_stats=False, seed=0)  # fmt: skip

    def tag(self) -> str:
        return serve.get_replica_context().replica_id.unique_id

    def _filler(self) -> None:
        self.llm.generate([FILLER], self._params(temperature=0.0, max_tokens=24))

    def generate(self, prompt: str, max_tokens: int) -> dict:
        """Greedy output of `prompt` and the proposer's acceptance on it, on whichever replica answers."""
        self._filler()
        before = spec_decode_counters(self.llm)
        start = time.perf_counter()
        out = self.llm.generate([prompt], self._params(temperature=0.0, max_tokens=max_tokens))[0].outputs[0]
        seconds = time.perf_counter() - start
        after = spec_decode_counters(self.llm)
        self._filler()
        time.sleep(0.5)
        self._filler()
        drafts = after.get("vllm:spec_decode_num_drafts", 0) - before.get("vllm:spec_decode_num_drafts", 0)
        accepted = (after.get("vllm:spec_decode_num_accepted_tokens", 0)
                    - before.get("vllm:spec_decode_num_accepted_tokens", 0))  # fmt: skip
        return {"replica": self.tag(), "token_ids": list(out.token_ids),
                "accepted_per_draft": accepted / drafts if drafts else 0.0,
                "tokens_per_s": len(out.token_ids) / seconds}  # fmt: skip

