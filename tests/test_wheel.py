"""The built wheel carries what the package reads at run time: a check on the artifact users install,
not on the source tree (a wheel once shipped without the default model's answers, and
`answers_for` then quietly found nothing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

READ_FROM_THE_WHEEL = """
import json, sys
from pathlib import Path
import aded
from aded.bench.questions import question_file
from aded.store.answers import answers_for, packaged_answers_dir
from aded.store.datastore import TokenizerIdentity

assert Path(aded.__file__).is_relative_to(sys.argv[1]), aded.__file__  # the wheel's copy, not the tree
found = []
for path in sorted(packaged_answers_dir().glob("answers-*.jsonl")):
    identity = TokenizerIdentity.from_json(json.loads(path.read_text().splitlines()[0])["tokenizer"])
    found.append(str(answers_for(identity)))
print(json.dumps({"answers": found, "sessions": str(question_file("sessions"))}))
"""


def test_the_wheel_ships_the_default_answers_and_question_sets(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(ROOT)], check=True, cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("aded-*.whl"))
    unpacked = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        archive.extractall(unpacked)
    assert any(n.startswith("aded/store/data/answers-") for n in names)
    assert {"aded/bench/data/questions.jsonl", "aded/bench/data/sessions.jsonl"} <= set(names)
    env = {**os.environ, "PYTHONPATH": str(unpacked), "ADED_CACHE_DIR": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", READ_FROM_THE_WHEEL, str(unpacked)], env=env, cwd=tmp_path,
                         capture_output=True, text=True, check=True).stdout
    found = json.loads(out)
    assert found["answers"] and all(p.startswith(str(unpacked)) for p in found["answers"])
    assert found["sessions"].startswith(str(unpacked))
