"""A prepared check of aded's draft trees on a GPU, run in one call the day a session is lent one.

ADED and its peers were published on GPUs because a GPU verifies a tree of dozens of tokens in about
the time of one; aded has only run on CPUs. This check answers, in one command of a few minutes:
- identity: greedy output of every drafter that needs no tokenizer (`none`, `pld`, `suffix`,
  `edit`) and of wide random trees (up to 32 nodes, mixing the true continuation with wrong tokens)
  equals transformers' `generate`, token for token, on a model of real shape with random weights
  (identity needs no trained weights), in bf16 and fp32; where it does not, the shared prefix says
  how far they agree;
- the cost of a tree: t(k)/t(0) for k = 0..64 nodes on Qwen2.5-0.5B-, 1.5B- and 7B-shaped models
  (bf16), each step timed as the decoding loop meets it (`budget.measure_costs`);
- the speedup: recorded greedy outputs of this repository (the shipped set and code edits on
  transformers, the sessions on llama.cpp) replayed through the decoding loop under the GPU's
  measured t(k) with trees of any width (`aded simulate`'s engine), every such drafter and the
  oracle. `aded` and `hybrid` need the recorded model's tokenizer for their datastore, which does
  not travel, so the replay names them skipped.

`--device cpu --tiny` runs the same code on tiny shapes in seconds (tests/test_gpu_check.py), so the
check cannot rot before a GPU is lent. Writes `gpu-check.json` and `report.md` to `--out`.

    bash scripts/gpu-check.sh            # on the device machine: --device cuda --out "$OUT"
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aded.drafters.base import Drafter
from aded.tree import DraftTree, TreeBuilder

__all__ = ["SHAPES", "run_check", "main"]

#: Qwen2.5 shapes: hidden, layers, attention heads, KV heads, FFN width, vocabulary
SHAPES = {
    "0.5b": (896, 24, 14, 2, 4864, 151936),
    "1.5b": (1536, 28, 12, 2, 8960, 151936),
    "7b": (3584, 28, 28, 4, 18944, 152064),
    "tiny": (64, 2, 4, 2, 128, 512),
}
SIZES = (0, 1, 2, 4, 8, 16, 24, 32, 48, 64)
#: recorded runs of this repository replayed under the measured t(k), by what they hold
RECORDINGS = {"shipped set": "hf-smollm2-shipped", "code edits": "hf-smollm2-edits-epyc",
              "sessions": "llama-smollm2-sessions"}
DRAFTERS = ("none", "pld", "suffix", "edit")
REPLAYED = ("pld", "suffix", "edit", "aded", "hybrid", "oracle")


def random_model(shape: str, dtype: torch.dtype, device: str, seed: int = 0):
    """A Qwen2-architecture causal LM of `shape` with random weights, made on `device`."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    hidden, layers, heads, kv_heads, ffn, vocab = SHAPES[shape]
    config = Qwen2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, intermediate_size=ffn, vocab_size=vocab,
                         max_position_embeddings=4096, tie_word_embeddings=shape in ("0.5b", "1.5b", "tiny"),
                         attn_implementation="sdpa")  # type: ignore[call-arg]  # taken from **kwargs; the dataclass stub omits it
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


class MixedTrees(Drafter):
    """Wide trees that mix the true continuation (to a random depth) with wrong tokens: every
    verification path of the runner (siblings, depths, rejected branches) is exercised."""

    name = "mixed-trees"

    def __init__(self, truth: Sequence[int], prompt_len: int, vocab: int, seed: int = 0) -> None:
        self.truth, self.prompt_len, self.vocab = list(truth), prompt_len, vocab
        self.rng = np.random.default_rng(seed)

    def propose(self, context_ids: Sequence[int], max_nodes: int) -> DraftTree:
        truth = self.truth[len(context_ids) - self.prompt_len:]
        builder = TreeBuilder(max_nodes)
        for _ in range(int(self.rng.integers(1, 7))):
            depth = int(self.rng.integers(1, 9))
            keep = int(self.rng.integers(0, min(depth, len(truth)) + 1))
            builder.add_path(truth[:keep] + self.rng.integers(0, self.vocab, depth - keep).tolist())
        return builder.build()


def check_identity(model, new_tokens: int, seed: int = 0) -> dict[str, Any]:
    """Every drafter's greedy output against `model.generate` on one prompt that repeats itself."""
    from aded.backends.hf import HFRunner
    from aded.backends.tokens import common_prefix
    from aded.budget import VerifyAll
    from aded.decoding import GenerationConfig, SpeculativeDecoder
    from aded.drafters import make_drafter

    vocab = model.config.vocab_size
    rng = np.random.default_rng(seed)
    block = rng.integers(0, vocab, 40).tolist()
    prompt = block + rng.integers(0, vocab, 24).tolist() + block[:20]  # something to copy
    ids = torch.tensor([prompt], device=model.device)
    with torch.inference_mode():
        reference = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                   max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                   pad_token_id=0)[0, len(prompt):].tolist()
    runner = HFRunner(model)
    out: dict[str, Any] = {}
    drafters: dict[str, Drafter] = {name: make_drafter(name, None) for name in DRAFTERS}
    drafters["mixed-trees"] = MixedTrees(reference, len(prompt), vocab, seed)
    for name, drafter in drafters.items():
        decoder = SpeculativeDecoder(runner, drafter, (), VerifyAll())
        result = decoder.generate(prompt, GenerationConfig(max_new_tokens=new_tokens, max_draft_nodes=32))
        tokens = list(result.token_ids)
        out[name] = {"identical": tokens == reference, "shared_prefix": common_prefix(tokens, reference),
                     "tokens": len(reference),
                     "mean_accepted_tokens": round(result.stats.mean_accepted_tokens, 3)}
    return out


def measure_curve(model, sizes: Sequence[int] = SIZES) -> dict[str, Any]:
    """t(k) for a tree of k nodes after 256 cached tokens, as the loop meets it."""
    from aded.backends.hf import HFRunner
    from aded.budget import measure_costs

    costs = measure_costs(HFRunner(model), sizes=tuple(sizes), past_len=256, repeats=5)
    plain = costs.seconds[0]
    return {"sizes": list(costs.sizes), "seconds": [round(s, 6) for s in costs.seconds],
            "relative": [round(s / plain, 3) for s in costs.seconds]}


def replay_speedups(curve: dict[str, Any], out_dir: Path, results_dir: Path) -> dict[str, Any]:
    """Each recording replayed under `curve` with trees of any width, per drafter: MAT and the
    predicted speedup over plain decoding at that t(k)."""
    from aded.drafters import drafter_class
    from aded.replay import simulate_results

    cost_file = out_dir / "cost-curve.json"
    cost_file.write_text(json.dumps({"sizes": curve["sizes"], "seconds": curve["seconds"]}))
    table: dict[str, Any] = {}
    for label, run in RECORDINGS.items():
        path = results_dir / run / "results.json"
        if not path.is_file():
            table[label] = {"skipped": f"{path} is missing"}
            continue
        results = json.loads(path.read_text())
        rows: dict[str, Any] = {}
        for name in REPLAYED:
            if name != "oracle" and drafter_class(name).needs_tokenizer:
                rows[name] = {"skipped": "needs the recorded model's tokenizer for its datastore"}
                continue
            summary = simulate_results(results, [name], budget=str(cost_file), max_leaves=None)
            cells = {row["category"]: row for row in summary}
            rows[name] = {"mean_accepted_tokens": cells["all"]["mean_accepted_tokens"],
                          "speedup": cells["all"]["predicted_speedup"],
                          "draft_ms_per_step": cells["all"]["draft_ms_per_step"],
                          "per_category": {c: r["predicted_speedup"] for c, r in cells.items() if c != "all"}}
        table[label] = rows
    return table


def run_check(device: str = "cuda", out: str | Path = "gpu-check", tiny: bool = False,
              new_tokens: int = 64, results_dir: str | Path | None = None) -> dict[str, Any]:
    """The whole check; writes `gpu-check.json` and `report.md` into `out` and returns the dict."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results_dir = Path(results_dir) if results_dir else Path(__file__).resolve().parents[2] / "benchmarks" / "results"
    started = time.perf_counter()
    report: dict[str, Any] = {"device": device, "machine": platform.platform(), "torch": torch.__version__,
                              "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
                              "identity": {}, "curves": {}, "replay": {}}
    identity_shape = "tiny" if tiny else "0.5b"
    for dtype in (torch.float32, torch.bfloat16):
        model = random_model(identity_shape, dtype, device)
        report["identity"][f"{identity_shape} {str(dtype).split('.')[-1]}"] = check_identity(model, new_tokens)
        del model
    for shape in ("tiny",) if tiny else ("0.5b", "1.5b", "7b"):
        model = random_model(shape, torch.bfloat16 if device.startswith("cuda") else torch.float32, device)
        report["curves"][shape] = measure_curve(model, SIZES[:5] if tiny else SIZES)
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    curve = report["curves"]["tiny" if tiny else "1.5b"]
    report["replay"] = {"curve": "tiny" if tiny else "1.5b", **replay_speedups(curve, out, results_dir)}
    report["seconds"] = round(time.perf_counter() - started, 1)
    (out / "gpu-check.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(render(report))
    return report


def render(report: dict[str, Any]) -> str:
    lines = [f"# aded GPU check: {report.get('gpu') or report['device']}", "",
             f"torch {report['torch']}, {report['machine']}, {report['seconds']} s.", "", "## Identity with generate", "",
             "| model | drafter | identical | shared prefix | MAT |", "|---|---|---|---:|---:|"]
    for model, rows in report["identity"].items():
        for name, row in rows.items():
            lines.append(f"| {model} | {name} | {'yes' if row['identical'] else 'NO'} | "
                         f"{row['shared_prefix']}/{row['tokens']} | {row['mean_accepted_tokens']:.2f} |")
    lines += ["", "## t(k)/t(0), a tree of k nodes", "", "| shape | t(0) ms | " +
              " | ".join(f"k={k}" for k in SIZES[1:]) + " |", "|---|" + "---:|" * len(SIZES)]
    for shape, curve in report["curves"].items():
        rel = dict(zip(curve["sizes"], curve["relative"]))
        lines.append(f"| {shape} | {curve['seconds'][0] * 1000:.2f} | " +
                     " | ".join(f"{rel[k]:.2f}" if k in rel else "-" for k in SIZES[1:]) + " |")
    replay = report["replay"]
    lines += ["", f"## Replay under the {replay['curve']} curve (trees of any width)", "",
              "| recording | drafter | MAT | predicted speedup |", "|---|---|---:|---:|"]
    for label, rows in replay.items():
        if label == "curve":
            continue
        if "skipped" in rows:
            lines.append(f"| {label} | - | - | skipped: {rows['skipped']} |")
            continue
        for name, row in rows.items():
            if "skipped" in row:
                lines.append(f"| {label} | {name} | - | skipped: {row['skipped']} |")
            else:
                mat, speed = row["mean_accepted_tokens"], row["speedup"]
                lines.append(f"| {label} | {name} | {mat if mat is None else f'{mat:.2f}'} | "
                             f"{speed if speed is None else f'{speed:.2f}x'} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (the check) or cpu (its rehearsal)")
    parser.add_argument("--out", default="gpu-check", help="folder for gpu-check.json and report.md")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes only (a rehearsal in seconds)")
    parser.add_argument("-n", "--new-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device here; --device cpu --tiny rehearses the check")
    report = run_check(args.device, args.out, args.tiny, args.new_tokens)
    print(render(report))


if __name__ == "__main__":
    main()
