"""Several clients at once on llama.cpp (issue 30): a measurement, not a test.

Four clients, each sending a few requests one after another (greedy, each request its own drafter
and budget), through `Gather` on a runner with four slots, against the same requests one at a time
on a one-slot runner of the same settings (file, context, threads, batch) with drafter `suffix` and
the solo budget, as `aded.load` runs them. The gathered runs (`--variants`): `gathered` (drafter
`suffix`, `Gather.budget`: steps priced as gathered decoding pays for them), `gathered_solo_budget`
(drafter `suffix`, each request's budget over the solo t(k)) and `gathered_plain` (drafter `none`).
It reports aggregate tokens a second (every generated token over the wall time of the whole set),
whether every gathered output equals its one-at-a-time output, and the time to first token of a
short request sent right behind a long (~1500-token) prompt, gathered and one at a time.

    .venv/bin/python benchmarks/concurrency.py --rounds 3      # ~10 minutes on 2 cores
    .venv/bin/python benchmarks/concurrency.py --exactness --decode-costs   # also: unified vs
        # non-unified KV bits, and what one llama_decode costs per row layout

Writes benchmarks/results/llama-smollm2-concurrency/results.json (or --out). Other processes on the
machine change every number here: `--rounds N` runs both methods N times, interleaved, and keeps
each one's fastest round (other load only ever adds time); the load average at the start and end is
recorded with them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "llama-smollm2-concurrency"


def chat_ids(runner, tokenizer, text: str) -> list[int]:
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                           tokenize=False)
    return runner.tokenize(prompt)


def request_prompts(runner, tokenizer, n: int) -> list[list[int]]:
    """First turns of the shipped questions, then of the code-edit set: chat, summaries, edits."""
    from aded.bench.questions import load_questions

    texts = [q.turns[0] for q in load_questions()]
    texts += [q.turns[0] for q in load_questions([HERE / "questions" / "code_edits.jsonl"])]
    if len(texts) < n:
        raise SystemExit(f"only {len(texts)} prompts available, {n} asked for")
    return [chat_ids(runner, tokenizer, t) for t in texts[:n]]


def long_prompt(runner, tokenizer, tokens: int) -> list[int]:
    from aded.bench.questions import load_questions

    code = load_questions([HERE / "questions" / "code_edits.jsonl"])[0].turns[0]
    text = code
    while len(chat_ids(runner, tokenizer, text + "\n\n" + code)) <= tokens:
        text += "\n\n" + code
    return chat_ids(runner, tokenizer, text)


class Client:
    """What one request needs besides the runner: a fresh drafter and budget, greedy decoding.
    `budget(costs)` makes the budget (default: the solo budget `aded.load` gives a request)."""

    def __init__(self, tokenizer, costs, eos, max_new: int, drafter: str = "suffix", budget=None) -> None:
        self.tokenizer, self.costs, self.eos, self.max_new = tokenizer, costs, eos, max_new
        self.drafter = drafter
        self.budget = budget

    def decoder(self, runner):
        from aded.budget import new_budget
        from aded.decoding import SpeculativeDecoder
        from aded.drafters import make_drafter

        budget = (self.budget or new_budget)(self.costs)
        return SpeculativeDecoder(runner, make_drafter(self.drafter, self.tokenizer), self.eos, budget)

    def config(self, max_new: int | None = None):
        from aded.decoding import GenerationConfig

        return GenerationConfig(max_new_tokens=max_new or self.max_new)


def timed_stream(decoder, ids, config, submitted: float) -> dict:
    """Run one request; its tokens, time to first token and end, from `submitted`."""
    stream = decoder.stream(ids, config)
    first = None
    for _ in stream:
        if first is None:
            first = time.perf_counter()
    result = stream.result
    end = time.perf_counter()
    return {"prompt_tokens": len(ids), "tokens": result.token_ids, "ttft_s": (first or end) - submitted,
            "total_s": end - submitted, "steps": result.stats.steps,
            "mean_accepted_tokens": round(result.stats.mean_accepted_tokens, 3),
            "cached_prompt_tokens": result.stats.cached_prompt_tokens}


def one_at_a_time(runner, client: Client, prompts: list[list[int]]) -> tuple[list[dict], float]:
    out = []
    start = time.perf_counter()
    for ids in prompts:
        runner.forget()  # every request computes its whole prompt, as the gathered ones do
        out.append(timed_stream(client.decoder(runner), ids, client.config(), time.perf_counter()))
    return out, time.perf_counter() - start


def gathered(gather, client: Client, prompts: list[list[int]], clients: int, tag: object = None
             ) -> tuple[list[dict], float]:
    """`clients` threads, client c sending prompts c, c + clients, ... one after another; every
    request its own owner, so that none starts from another's (or an earlier round's) prompt."""
    out: list[dict | None] = [None] * len(prompts)
    errors: list[BaseException] = []

    def run(c: int) -> None:
        try:
            for i in range(c, len(prompts), clients):
                submitted = time.perf_counter()
                with gather.session(prompts[i], owner=(tag, i)) as view:
                    out[i] = timed_stream(client.decoder(view), prompts[i], client.config(), submitted)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out, time.perf_counter() - start  # type: ignore[return-value]


def behind_a_long_prompt(gather, solo, client: Client, long_ids, short_ids, delay_s: float) -> dict:
    """Time to first token of a short request sent `delay_s` after a long one."""
    results: dict[str, dict] = {}

    def run(name, ids, max_new):
        submitted = time.perf_counter()
        with gather.session(ids, owner=name) as view:
            results[name] = timed_stream(client.decoder(view), ids, client.config(max_new), submitted)

    long_thread = threading.Thread(target=run, args=("long", long_ids, 64))
    long_thread.start()
    time.sleep(delay_s)
    run("short", short_ids, 32)
    long_thread.join()
    # one at a time, the short request waits for the whole long one
    solo.forget()
    long_alone = timed_stream(client.decoder(solo), long_ids, client.config(64), time.perf_counter())
    solo.forget()
    short_alone = timed_stream(client.decoder(solo), short_ids, client.config(32), time.perf_counter())
    return {"long_prompt_tokens": len(long_ids), "short_prompt_tokens": len(short_ids), "delay_s": delay_s,
            "gathered": {"short_ttft_s": round(results["short"]["ttft_s"], 3),
                         "long_ttft_s": round(results["long"]["ttft_s"], 3),
                         "short_identical": results["short"]["tokens"] == short_alone["tokens"],
                         "long_identical": results["long"]["tokens"] == long_alone["tokens"]},
            "one_at_a_time": {"short_ttft_s": round(long_alone["total_s"] - delay_s + short_alone["ttft_s"], 3),
                              "long_ttft_s": round(long_alone["ttft_s"], 3),
                              "short_alone_ttft_s": round(short_alone["ttft_s"], 3)}}


# ---------------------------------------------------------------------------- what a decode costs
DECODE_LAYOUTS = {  # name: (context kind, rows per sequence; sequences of 300 cached positions)
    "one sequence, 1 row": ("solo", [1]), "one sequence, 2 rows": ("solo", [2]),
    "one sequence, 4 rows": ("solo", [4]), "one sequence, 8 rows": ("solo", [8]),
    "one sequence of 1500, 1 row": ("solo-long", [1]),
    "4 slots, 1 row of one": ("slots", [1]), "4 slots, 1 row each": ("slots", [1, 1, 1, 1]),
    "4 slots, 2 rows each": ("slots", [2, 2, 2, 2]), "4 slots, rows 1,1,1,4": ("slots", [1, 1, 1, 4]),
    # the fourth slot holds 1500 positions: every slot's rows attend over its 1536 padded cells
    "4 slots (one of 1500), 1 row each": ("slots-uneven", [1, 1, 1, 1]),
    "unified, 1 row each": ("unified", [1, 1, 1, 1]), "unified, 2 rows each": ("unified", [2, 2, 2, 2]),
}


def decode_costs(path: str, threads: int, repeats: int = 30) -> dict:
    """Median milliseconds of one `llama_decode` per row layout after 300 cached positions a
    sequence, the layouts interleaved (so the machine's other load hits them alike), each timed as
    the second of two decodes of its shape (llama.cpp reuses the graph, as steady decoding does)."""
    import llama_cpp as lib
    import numpy as np

    from aded.backends.llama_cpp import _quiet

    _quiet(lib)
    model = lib.llama_model_load_from_file(path.encode(), lib.llama_model_default_params())
    batch = lib.llama_batch_init(512, 0, 1)

    def run(ctx, rows):
        batch.n_tokens = len(rows)
        for i, (t, pos, s, want) in enumerate(rows):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, pos, 1, want
            batch.seq_id[i][0] = s
        assert lib.llama_decode(ctx, batch) == 0

    def context(n_ctx, n_seq, unified, past=(300, 300, 300, 300)):
        p = lib.llama_context_default_params()
        p.n_ctx, p.n_batch, p.n_ubatch, p.n_seq_max, p.kv_unified = n_ctx, 512, 512, n_seq, unified
        p.n_threads = p.n_threads_batch = threads
        p.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
        p.no_perf = True
        ctx = lib.llama_init_from_model(model, p)
        for s in range(n_seq):
            for a in range(0, past[s], 512):
                run(ctx, [(100 + j, j, s, False) for j in range(a, min(past[s], a + 512))])
        return ctx, list(past)

    contexts = {"solo": context(2048, 1, False), "solo-long": context(2048, 1, False, (1500,)),
                "slots": context(2048 * 4, 4, False),
                "slots-uneven": context(2048 * 4, 4, False, (300, 300, 300, 1500)),
                "unified": context(2048 * 4, 4, True)}
    times: dict[str, list[float]] = {name: [] for name in DECODE_LAYOUTS}
    for rep in range(repeats + 1):
        for name, (kind, shape) in DECODE_LAYOUTS.items():
            ctx, past = contexts[kind]
            for _ in range(2):
                rows = [(500 + j, past[s] + j, s, True) for s, n in enumerate(shape) for j in range(n)]
                start = time.perf_counter()
                run(ctx, rows)
                elapsed = time.perf_counter() - start
                for s in range(len(shape)):
                    lib.llama_memory_seq_rm(lib.llama_get_memory(ctx), s, past[s], -1)
            if rep:
                times[name].append(elapsed)
    for ctx, _ in contexts.values():
        lib.llama_free(ctx)
    lib.llama_batch_free(batch)
    lib.llama_model_free(model)
    return {name: round(float(np.median(t)) * 1000, 2) for name, t in times.items()}


# ---------------------------------------------------------------------------- exactness
def exactness(path: str, threads: int) -> dict:
    """Do client A's logits change bit-wise when client B's rows share the batch or B holds cells?
    One context per KV layout (unified, non-unified), compared with A decoded alone."""
    import llama_cpp as lib
    import numpy as np

    from aded.backends.llama_cpp import _quiet

    _quiet(lib)
    model = lib.llama_model_load_from_file(path.encode(), lib.llama_model_default_params())
    vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model))
    rng = np.random.default_rng(0)
    pa, pb = rng.integers(100, 30000, 100).tolist(), rng.integers(100, 30000, 600).tolist()
    steps, bsteps = rng.integers(100, 30000, 24).tolist(), rng.integers(100, 30000, 200).tolist()
    batch = lib.llama_batch_init(1024, 0, 1)

    def context(n_ctx, n_seq, unified):
        p = lib.llama_context_default_params()
        p.n_ctx, p.n_batch, p.n_ubatch, p.n_seq_max, p.kv_unified = n_ctx, 512, 512, n_seq, unified
        p.n_threads = p.n_threads_batch = threads
        p.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
        p.no_perf = True
        return lib.llama_init_from_model(model, p)

    def run(ctx, rows):  # (token, position, sequence, logits?)
        batch.n_tokens = len(rows)
        for i, (t, pos, s, want) in enumerate(rows):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, pos, 1, want
            batch.seq_id[i][0] = s
        assert lib.llama_decode(ctx, batch) == 0
        return {i: np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, i), (vocab,)).copy()
                for i, row in enumerate(rows) if row[3]}

    def prefill(ctx, ids, seq):
        for a in range(0, len(ids), 512):
            run(ctx, [(t, a + j, seq, False) for j, t in enumerate(ids[a:a + 512])])

    ctx = context(1024, 1, False)
    prefill(ctx, pa, 0)
    solo = [run(ctx, [(t, len(pa) + j, 0, True)])[0] for j, t in enumerate(steps)]
    lib.llama_free(ctx)
    out = []
    for unified in (True, False):
        for b_first in (True, False):
            for b_rows in (1, 3):
                ctx = context(4096, 4, unified)
                for ids, seq in ([(pb, 1), (pa, 0)] if b_first else [(pa, 0), (pb, 1)]):
                    prefill(ctx, ids, seq)
                bpos, same, worst = len(pb), 0, 0.0
                for j, t in enumerate(steps):
                    rows = [(t, len(pa) + j, 0, True)]
                    rows += [(bsteps[(bpos + r) % 200], bpos + r, 1, True) for r in range(b_rows)]
                    bpos += b_rows
                    got = run(ctx, rows)[0]
                    same += bool(np.array_equal(got, solo[j]))
                    worst = max(worst, float(np.abs(got - solo[j]).max()))
                lib.llama_free(ctx)
                out.append({"kv_unified": unified, "b_prefilled": "before A" if b_first else "after A",
                            "b_rows_per_step": b_rows, "identical_rows": same, "rows": len(steps),
                            "max_abs_diff": worst})
    lib.llama_batch_free(batch)
    lib.llama_model_free(model)
    return {"cases": out}


# ---------------------------------------------------------------------------- main
#: the gathered runs: name -> (drafter, budget), the budget "gathered" (`Gather.budget`) or "solo"
VARIANTS = {
    "gathered": ("suffix", "gathered"),
    "gathered_solo_budget": ("suffix", "solo"),
    "gathered_plain": ("none", "solo"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--per-client", type=int, default=3)
    parser.add_argument("--max-new", type=int, default=128)
    parser.add_argument("--long-tokens", type=int, default=1500)
    parser.add_argument("--n-ctx", type=int, default=None, help="per slot (default: the model's, up to 8192)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--max-wait-ms", type=float, default=None)
    parser.add_argument("--rounds", type=int, default=1, help="interleaved runs of each; the fastest of each kept")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"gathered runs to make, of {', '.join(VARIANTS)} (the first is the headline)")
    parser.add_argument("--decode-costs", action="store_true",
                        help="also time llama_decode per row layout (one sequence, slots, unified)")
    parser.add_argument("--exactness", action="store_true", help="also measure unified vs non-unified KV bits")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")

    from aded.backends.gather import DEFAULT_MAX_WAIT_S, Gather
    from aded.backends.llama_cpp import LlamaCppRunner
    from aded.backends.tokens import eos_token_ids
    from aded.budget import load_or_measure_costs
    from aded.models import load_tokenizer, resolve_model

    path = resolve_model(args.model).path
    tokenizer = load_tokenizer(args.model)
    load_start = os.getloadavg()
    solo = LlamaCppRunner(path, n_ctx=args.n_ctx, n_threads=args.threads)
    slotted = LlamaCppRunner(path, n_ctx=args.n_ctx, n_threads=args.threads, slots=args.clients)
    max_wait = DEFAULT_MAX_WAIT_S if args.max_wait_ms is None else args.max_wait_ms / 1000
    gather = Gather(slotted, max_wait_s=max_wait)
    costs = load_or_measure_costs(solo, f"{args.model}:gguf")  # what aded.load's budget prices at
    eos = eos_token_ids(solo, tokenizer)
    client = Client(tokenizer, costs, eos, args.max_new)
    clients = {name: Client(tokenizer, costs, eos, args.max_new, drafter,
                            gather.budget if budget == "gathered" else None)
               for name, (drafter, budget) in VARIANTS.items()}
    prompts = request_prompts(solo, tokenizer, args.clients * args.per_client)
    print(f"{path.name}: {len(prompts)} requests ({args.clients} clients x {args.per_client}), "
          f"{args.max_new} new tokens each, greedy, threads {solo.n_threads}, n_ctx {solo.n_ctx} per slot, "
          f"load average {load_start[0]:.2f}", flush=True)
    try:
        warm = prompts[0][:32]  # each runner's first decodes allocate their graphs
        one_at_a_time(solo, client, [warm])
        gathered(gather, client, [warm] * args.clients, args.clients, "warm-up")

        rounds: list[dict] = []
        best: dict[str, tuple] = {}  # method -> (results, wall, stats), its fastest round
        for r in range(args.rounds):
            base_r, wall_r = one_at_a_time(solo, client, prompts)
            record_r: dict = {"load_average": os.getloadavg()[0], "one_at_a_time_s": round(wall_r, 3)}
            if "one_at_a_time" not in best or wall_r < best["one_at_a_time"][1]:
                best["one_at_a_time"] = (base_r, wall_r, {})
            for name in variants:
                before = gather.stats.as_dict()
                got_r, wall_g = gathered(gather, clients[name], prompts, args.clients, (name, r))
                after = gather.stats.as_dict()
                stats_r = {k: after[k] - before[k] for k in ("decodes", "parts", "rows")}
                same = sum(g["tokens"] == b["tokens"] for g, b in zip(got_r, base_r))
                record_r[name] = {"wall_s": round(wall_g, 3), "identical": same, **stats_r}
                if name not in best or wall_g < best[name][1]:
                    best[name] = (got_r, wall_g, stats_r)
            rounds.append(record_r)
            print(f"round {r + 1}: one at a time {wall_r:.1f} s; " + "; ".join(
                f"{name} {record_r[name]['wall_s']:.1f} s ({record_r[name]['identical']}/{len(prompts)} identical)"
                for name in variants), flush=True)
        base, base_wall, _ = best["one_at_a_time"]
        identical = {name: min(rec[name]["identical"] for rec in rounds) for name in variants}
        ttft = behind_a_long_prompt(gather, solo, clients[variants[0]],
                                    long_prompt(solo, tokenizer, args.long_tokens),
                                    chat_ids(solo, tokenizer, "Name three primary colours."), 0.05)
        exact = exactness(str(path), solo.n_threads) if args.exactness else None
        costs_ms = decode_costs(str(path), solo.n_threads) if args.decode_costs else None
    finally:
        gather.close()
    load_end = os.getloadavg()

    def row(results, wall, stats=None) -> dict:
        tokens = sum(len(x["tokens"]) for x in results)
        out = {"wall_s": round(wall, 3), "tokens": tokens, "tokens_per_s": round(tokens / wall, 2),
               "mean_ttft_s": round(sum(x["ttft_s"] for x in results) / len(results), 3)}
        if stats:
            out["decodes"] = stats["decodes"]
            out["requests_per_decode"] = round(stats["parts"] / stats["decodes"], 3) if stats["decodes"] else 0.0
        return out

    rows = {"one_at_a_time": row(base, base_wall)}
    for name in variants:
        rows[name] = {**row(*best[name]), "identical": identical[name]}
        rows[name]["speedup"] = round(rows[name]["tokens_per_s"] / rows["one_at_a_time"]["tokens_per_s"], 3)
    headline = variants[0]
    print()
    print("| method               | drafter | budget   | tokens | wall s | aggregate tok/s | vs one at a time | "
          "mean TTFT s | identical |")
    print("|----------------------|---------|----------|--------|--------|-----------------|------------------|"
          "-------------|-----------|")
    for name, r_ in rows.items():
        drafter, budget = ("suffix", "solo") if name == "one_at_a_time" else VARIANTS[name]
        same = f"{r_['identical']}/{len(prompts)}" if "identical" in r_ else "-"
        speed = f"{r_['speedup']:.2f}x" if "speedup" in r_ else "1.00x"
        print(f"| {name:20s} | {drafter:7s} | {budget:8s} | {r_['tokens']:6d} | {r_['wall_s']:6.1f} | "
              f"{r_['tokens_per_s']:15.1f} | {speed:>16s} | {r_['mean_ttft_s']:11.3f} | {same:9s} |")
    print(f"\naggregate speedup ({headline} / one at a time): {rows[headline]['speedup']:.2f}x "
          f"({rows[headline]['requests_per_decode']:.2f} requests per decode)")
    print(f"short request {ttft['delay_s']} s behind a {ttft['long_prompt_tokens']}-token prompt ({headline}): "
          f"time to first token {ttft['gathered']['short_ttft_s']:.2f} s gathered, "
          f"{ttft['one_at_a_time']['short_ttft_s']:.2f} s one at a time "
          f"(alone {ttft['one_at_a_time']['short_alone_ttft_s']:.2f} s); identical: "
          f"{ttft['gathered']['short_identical'] and ttft['gathered']['long_identical']}")
    if exact is not None:
        print("\nexactness (client A's one-token rows beside client B, compared with A alone):")
        for case in exact["cases"]:
            print(f"  kv_unified={case['kv_unified']!s:5s} B prefilled {case['b_prefilled']}, "
                  f"B rows/step {case['b_rows_per_step']}: {case['identical_rows']}/{case['rows']} "
                  f"identical, max |diff| {case['max_abs_diff']:.3g}")
    if costs_ms is not None:
        print("\none llama_decode, median ms (300 cached positions a sequence unless said):")
        for name, ms in costs_ms.items():
            print(f"  {name:34s} {ms:6.1f}")
    print(f"load average: {load_start[0]:.2f} at the start, {load_end[0]:.2f} at the end")

    record = {
        "model": args.model, "file": path.name, "runner": slotted.describe(),
        "settings": {"clients": args.clients, "per_client": args.per_client, "max_new_tokens": args.max_new,
                     "greedy": True, "variants": {name: dict(zip(("drafter", "budget"), VARIANTS[name]))
                                                  for name in variants},
                     "baseline": "the same requests one at a time on a one-slot runner of the same file, "
                                 "context, threads and batch; drafter suffix, the solo budget over the "
                                 "measured t(k) (what aded.load gives)",
                     "max_wait_s": max_wait, "chunk_s": gather.chunk_s, "rounds": args.rounds,
                     "kept": "each method's fastest round"},
        "machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                    "load_average_start": load_start, "load_average_end": load_end,
                    "python": sys.version.split()[0]},
        "measured": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "results": rows, "aggregate_speedup": rows[headline]["speedup"], "headline": headline,
        "identical": identical, "requests": len(prompts), "rounds": rounds,
        "time_to_first_token": ttft,
        "per_request": [{"prompt_tokens": b["prompt_tokens"], "tokens": len(b["tokens"]),
                         "one_at_a_time_s": round(b["total_s"], 3),
                         **{f"{name}_s": round(best[name][0][i]["total_s"], 3) for name in variants},
                         "mean_accepted_tokens": {"one_at_a_time": b["mean_accepted_tokens"],
                                                  **{name: best[name][0][i]["mean_accepted_tokens"]
                                                     for name in variants}}}
                        for i, b in enumerate(base)],
        "exactness": exact,
        "decode_costs_ms": costs_ms,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out / 'results.json'}")
    solo.close()
    slotted.close()
    return 0 if all(n == len(prompts) for n in identical.values()) and ttft["gathered"]["short_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
