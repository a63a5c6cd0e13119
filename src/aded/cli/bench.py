"""`aded bench` (run, `compare`) and `aded simulate`; the work lives in `aded.bench` and `aded.replay`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from aded.cli.common import ModelOpt, NodesOpt, RepackOpt, friendly, split_list

__all__ = ["bench_app", "simulate_command"]

bench_app = typer.Typer(
    help="Compare every method side by side (Spec-Bench style): speedup and mean accepted tokens per task.",
    invoke_without_command=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@bench_app.callback()
def bench(
    ctx: typer.Context,
    model: str = ModelOpt,
    questions: list[Path] = typer.Option([], "--questions", "-q", dir_okay=False,
                                         help="A question file (JSON Lines; repeatable), or a shipped set: mixed (the default) or sessions."),
    methods: str = typer.Option("all", "--methods", help="Comma-separated methods, or all: the backend's plain decoding and "
                                "prompt lookup (hf, hf-pld or llama.cpp, llama.cpp-pld), every drafter, oracle. On llama.cpp also, by name: "
                                "llama-server and llama-server-<ngram-simple|ngram-map-k|ngram-map-k4v|ngram-mod|ngram-cache> "
                                "(scripts/build-llama-server.sh builds it)."),
    backend: str = typer.Option("auto", "--backend", help="auto (llama.cpp for GGUF files when installed), hf, or llama.cpp."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", min=1, help="Most tokens per turn."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="At most K questions, spread over categories."),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="0 = greedy (outputs compared with hf)."),
    out: Path | None = typer.Option(None, "--out", "-o", file_okay=False, help="Output folder (default: bench-results/<timestamp>)."),
    dtype: str = typer.Option("float32", "--dtype", help="float32 or bfloat16."),
    threads: int | None = typer.Option(None, "--threads", min=1, help="torch threads (default: physical cores)."),
    max_draft_nodes: int = NodesOpt,
    budget: str = typer.Option("measured", "--budget", help="measured (cached t(k)), fresh (time t(k) now), typical, or off: how aded methods size trees."),
    seed: int = typer.Option(0, "--seed", help="Seed for sampling."),
    warmup: bool = typer.Option(True, "--warmup/--no-warmup", help="Run every code path once before timing."),
    repeats: int = typer.Option(1, "--repeats", min=1, max=20,
                                help="Run every turn R times per method; rates are over all R (per-question "
                                     "timings spread by several percent on a small CPU)."),
    repack: str = RepackOpt,
) -> None:
    """Run the benchmark (the default action); `aded bench compare A B` compares two runs."""
    if ctx.invoked_subcommand is not None:
        return
    friendly(_run)(model, questions, methods, backend, max_new_tokens, limit, temperature, out, dtype,
              threads, max_draft_nodes, budget, seed, warmup, repeats, repack)


def _run(model, questions, methods, backend, max_new_tokens, limit, temperature, out, dtype, threads,
         max_draft_nodes, budget, seed, warmup, repeats, repack="auto") -> None:
    import torch

    from aded.backends.select import choose_backend, load_runner
    from aded.bench.catalog import known_methods
    from aded.bench.methods import method_names
    from aded.bench.progress import BenchProgress
    from aded.bench.questions import load_questions
    from aded.bench.report import render_report, write_outputs
    from aded.bench.runner import BenchConfig, physical_cores, run_bench
    from aded.progress import console, status

    chosen = choose_backend(model, backend)
    known = known_methods(chosen)
    names = method_names(chosen) if methods.strip() == "all" else split_list(methods)
    unknown = [n for n in names if n not in known]
    if unknown:  # before the model loads: a typo should cost nothing
        raise ValueError(f"unknown method(s) {', '.join(map(repr, unknown))}; choose from: {', '.join(known)}")
    config = BenchConfig(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                         max_draft_nodes=max_draft_nodes, budget=budget, warmup=warmup, repeats=repeats)
    selected = load_questions(questions, limit)
    torch.set_num_threads(threads or physical_cores())
    out_dir = out or Path("bench-results") / time.strftime("%Y%m%d-%H%M%S")
    with status(f"Loading {model}"):
        runner, tokenizer, model_id = load_runner(model, backend, dtype=dtype,
                                                  threads=threads or physical_cores(), repack=repack)
    results = run_bench(runner, tokenizer, selected, names, config, model_name=model,
                        progress=BenchProgress(), model_id=model_id)
    if not results["questions"]:
        raise typer.Exit(130 if results["config"]["interrupted"] else 2)
    paths = write_outputs(results, out_dir)
    console.print(render_report(results).split("\n## Mean")[0].strip(), markup=False)
    typer.echo(str(out_dir))
    console.print(f"[dim]wrote {', '.join(p.name for p in paths)}[/dim]")
    if results["config"]["interrupted"]:
        console.print(f"interrupted: the results cover the first {results['config']['questions']} questions")
        raise typer.Exit(130)


@bench_app.command("compare")
def compare_command(
    a: Path = typer.Argument(..., help="A results folder (or its results.json)."),
    b: Path = typer.Argument(..., help="Another results folder (or results.json)."),
    category: str = typer.Option("all", "--category", help="A category, all, or * for every category."),
    as_json: bool = typer.Option(False, "--json", help="Print the comparison rows as JSON."),
) -> None:
    """Print the difference between two benchmark runs, per method."""
    friendly(_compare)(a, b, category, as_json)


def _compare(a: Path, b: Path, category: str, as_json: bool) -> None:
    from aded.bench.report import compare, load_results, render_compare

    rows = compare(load_results(a), load_results(b))
    if as_json:
        typer.echo(json.dumps({"compare": rows}))
        return
    typer.echo(render_compare(rows, str(a), str(b), None if category == "*" else category), nl=False)


@friendly
def simulate_command(
    recorded: Path = typer.Option(..., "--recorded", "-r", help="results.json of an `aded bench` run (or its folder)."),
    drafters: str = typer.Option("pld,suffix,oracle", "--drafters", "-d",
                                 help="Comma-separated drafter names; oracle (the recording itself) is the ceiling."),
    model: str | None = typer.Option(None, "--model", "-m", help="Tokenizer source (default: the run's model)."),
    budget: str = typer.Option("recorded", "--budget",
                               help="recorded (the run's t(k)), typical, off, or a file of measured t(k): a cost "
                                    "cache file of either backend (~/.cache/aded/costs/*.json) or a results.json."),
    max_draft_nodes: int | None = typer.Option(None, "--max-draft-nodes", min=0, max=1024,
                                                  help="Largest draft tree (default: the run's)."),
    model_topk: int = typer.Option(0, "--model-topk", min=0, max=64,
                                   help="Load the run's model and give drafters its top K tokens along the "
                                        "recorded outputs, as real runs do (aded learns from them); 0: none."),
    max_tree_leaves: int | None = typer.Option(None, "--max-tree-leaves", min=0, max=1024,
                                                  help="Paths per verification (default: the run's runner's, "
                                                       "1 on llama.cpp; 0: any tree, as transformers verifies)."),
    repeats: int = typer.Option(1, "--repeats", min=1, max=100,
                                help="Replay each drafter N times and report means with the range (a budget "
                                     "follows real drafting time, so replays differ a little)."),
    as_json: bool = typer.Option(False, "--json", help='Print {"summary": [...]} as JSON.'),
) -> None:
    """Replay a benchmark's recorded outputs through drafters, without the model (seconds, not minutes)."""
    from aded.bench.report import load_results
    from aded.models import load_tokenizer
    from aded.replay import render_simulation, simulate_results

    results = load_results(recorded)
    source = model or results.get("model")
    summary = simulate_results(results, split_list(drafters),
                               (lambda: load_tokenizer(source)) if source else None,
                               budget=budget, max_nodes=max_draft_nodes, model_topk=model_topk,
                               runner_loader=lambda: _recorded_runner(results, source),
                               max_leaves=-1 if max_tree_leaves is None else (max_tree_leaves or None),
                               repeats=repeats)
    if as_json:
        typer.echo(json.dumps({"summary": summary}))
    else:
        typer.echo(render_simulation(summary), nl=False)


def _recorded_runner(results: dict, model: str | None):
    """The model a run recorded, on the run's backend (for `--model-topk`)."""
    from aded.backends.select import load_runner

    if not model:
        raise ValueError("the results name no model: pass --model")
    return load_runner(model, backend=results.get("config", {}).get("backend") or "auto")[0]
