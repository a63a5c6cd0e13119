"""A Ray Serve deployment whose replicas each run aded's vLLM proposer and share what it learns.

Each replica drives its own `AdedProposer` through vLLM's calling convention with a greedy
reference continuation standing in for the target model (the proposer cannot tell the
difference), so two replicas and the shared-state actor fit beside other work on two CPU cores.
"""

from __future__ import annotations

import time

import numpy as np
from ray import serve

from aded.integrations.shared_state import RayTransport, SharedStateClient
from aded.integrations.vllm import AdedProposer

SHARED_NAME = "aded-integration-shared"


@serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 0.1})
class ProposerReplica:
    def __init__(self) -> None:
        shared = SharedStateClient(RayTransport(SHARED_NAME), interval_s=0.2)
        self.proposer = AdedProposer(None, drafter="aded", k=4, shared=shared)

    def tag(self) -> str:
        return serve.get_replica_context().replica_id.unique_id

    def teach(self, prompt: list[int], output: list[int]) -> dict:
        """Serve one request (prompt -> output) through the proposer, then end it so it is learned."""
        text, n = prompt + output, len(prompt) + 1
        tokens = np.zeros((1, len(text) + 8), dtype=np.int64)
        tokens[0, :n] = text[:n]
        sampled = [text[n - 1 : n]]
        while n < len(text):
            draft = self.proposer.propose(sampled, np.array([n]), tokens)[0]
            accepted = 0
            while accepted < len(draft) and n + accepted < len(text) - 1 and draft[accepted] == text[n + accepted]:
                accepted += 1
            commit = text[n : n + accepted + 1]
            tokens[0, n : n + len(commit)] = commit
            n += len(commit)
            sampled = [commit]
        self.proposer.finish_all()
        delivered = self.proposer.shared.flush(timeout_s=30.0)
        return {"replica": self.tag(), "delivered": delivered, "stats": self.proposer.stats.as_dict()}

    def draft(self, context: list[int], wait_s: float = 5.0) -> dict:
        """The proposer's draft after `context`, once a shared snapshot newer than none has arrived."""
        deadline = time.monotonic() + wait_s
        while self.proposer.shared.version == 0 and time.monotonic() < deadline:
            self.proposer.shared.poll()
            time.sleep(0.05)
        tokens = np.asarray([context], dtype=np.int64)
        draft = self.proposer.propose([[context[-1]]], np.array([len(context)]), tokens)[0]
        self.proposer.finish_all()
        return {"replica": self.tag(), "draft": draft, "version": self.proposer.shared.version}


app = ProposerReplica.bind()
