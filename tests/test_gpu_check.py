"""The prepared GPU check rehearsed on the CPU with tiny shapes, so it cannot rot before a GPU is lent."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from aded.gpu_check import run_check

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_check_runs_on_tiny_shapes_and_reports_identity_costs_and_replay(tmp_path):
    report = run_check(device="cpu", out=tmp_path, tiny=True, new_tokens=16)
    for model, rows in report["identity"].items():
        assert set(rows) == {"none", "pld", "suffix", "edit", "mixed-trees"}
        assert all(row["identical"] for row in rows.values()), (model, rows)
    curve = report["curves"]["tiny"]
    assert curve["sizes"][0] == 0 and curve["relative"][0] == 1.0 and len(curve["sizes"]) == len(curve["seconds"])
    shipped = report["replay"]["shipped set"]
    assert shipped["oracle"]["speedup"] >= shipped["pld"]["speedup"] > 0
    assert "skipped" in shipped["aded"]  # its datastore needs the recorded model's tokenizer
    assert json.loads((tmp_path / "gpu-check.json").read_text())["device"] == "cpu"
    assert "## Identity with generate" in (tmp_path / "report.md").read_text()


def test_the_device_script_rehearses_on_the_cpu(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check.sh"), "--device", "cpu", "--tiny", "-n", "8"],
                          capture_output=True, text=True, timeout=600, env={**__import__("os").environ, "OUT": str(tmp_path)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert {"gpu-check.json", "report.md", "log.txt", "cost-curve.json"} <= {p.name for p in tmp_path.iterdir()}
