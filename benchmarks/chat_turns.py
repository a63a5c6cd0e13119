"""A conversation end to end on llama.cpp: each turn's prefill and decoding, aded against
llama-cpp-python's own `Llama.generate`, as a chat user meets them.

    python benchmarks/chat_turns.py                 # the default model, five turns, 160 new tokens
    python benchmarks/chat_turns.py -n 256 --drafter hybrid

`aded bench` times decoding alone, every turn from an empty cache. A chat is different: each turn's
prompt is the whole conversation so far, and both engines keep what the previous turn computed
(llama-cpp-python's `generate` keeps the longest prefix its last call shares; aded's runner does the
same where it is exact). This script feeds both the same prompt ids turn after turn (the answers are
identical, so one conversation serves both), alternates which engine goes first, and reports each
turn's wall time, prefill included, with the prompt tokens aded kept.
"""

from __future__ import annotations

import argparse
import time

TURNS = [
    "Write a Python function that parses a CSV file and returns a list of dicts.",
    "Now add error handling for missing files.",
    "Add type hints and a docstring.",
    "Write three pytest tests for it.",
    "Summarise what the function does in two sentences.",
]


def main() -> None:
    import aded
    from aded.drafters import DEFAULT_DRAFTER
    from aded.models import DEFAULT_MODEL
    from llama_cpp import Llama

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--drafter", default=DEFAULT_DRAFTER)
    parser.add_argument("-n", "--max-new-tokens", type=int, default=160)
    args = parser.parse_args()

    lm = aded.load(args.model, drafter=args.drafter, backend="llama.cpp")
    runner = lm.runner
    llm = Llama(model_path=str(runner.path), n_ctx=runner.n_ctx, n_threads=runner.n_threads,
                n_threads_batch=runner.n_threads, n_batch=runner.n_batch, n_ubatch=runner.n_batch,
                verbose=False)
    end = set(runner.eos_token_ids)

    def llama_cpp_python(ids: list[int]) -> list[int]:
        out: list[int] = []
        for token in llm.generate(ids, temp=0.0, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0,
                                  repeat_penalty=1.0):
            out.append(int(token))
            if token in end or len(out) >= args.max_new_tokens:
                break
        return out

    print(f"{lm.drafter.name} on {runner.path.name}; prefix reuse {'on' if runner.reuse_prefix else 'off'} "
          f"(exact on this file and build: {runner.reuse_prefix})")
    print("| turn | prompt tokens | kept by aded | new tokens | llama-cpp-python s | aded s | speedup | identical |")
    print("|---:|---:|---:|---:|---:|---:|---:|---|")
    messages: list[dict[str, str]] = []
    totals = [0.0, 0.0]
    for turn, text in enumerate(TURNS):
        messages.append({"role": "user", "content": text})
        ids = lm.prompt_ids(messages)
        timed: dict[str, float] = {}
        for name in (("llama", "aded") if turn % 2 == 0 else ("aded", "llama")):
            start = time.perf_counter()
            if name == "aded":
                completion = lm.generate(ids, max_new_tokens=args.max_new_tokens)
            else:
                reference = llama_cpp_python(ids)
            timed[name] = time.perf_counter() - start
        totals[0] += timed["llama"]
        totals[1] += timed["aded"]
        print(f"| {turn + 1} | {len(ids)} | {completion.stats.cached_prompt_tokens} | {len(completion.token_ids)} | "
              f"{timed['llama']:.2f} | {timed['aded']:.2f} | {timed['llama'] / timed['aded']:.2f}x | "
              f"{'yes' if completion.token_ids == reference else 'NO'} |")
        messages.append({"role": "assistant", "content": completion.text})
    print(f"| all | | | | {totals[0]:.2f} | {totals[1]:.2f} | {totals[0] / totals[1]:.2f}x | |")


if __name__ == "__main__":
    main()
