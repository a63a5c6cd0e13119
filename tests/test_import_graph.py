"""The package's layering holds: no module imports, however late or only for types, a module that
imports it back (scripts/import-graph.py reads the imports; nothing is imported)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "import-graph.py"


def run_checker(src: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), str(src)], capture_output=True, text=True, timeout=60)


def test_aded_has_no_import_cycles():
    proc = run_checker(ROOT / "src")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no import cycles" in proc.stdout


def test_checker_sees_late_type_only_and_relative_imports(tmp_path):
    """A clean run means something only if every kind of import is an edge."""
    package = tmp_path / "aded"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from aded.b import x\n")
    (package / "b.py").write_text("def f():\n    from . import c\n")
    (package / "c.py").write_text("import aded.a\nfrom .sub import d\n")
    (package / "sub" / "d.py").write_text("from ..c import y\n")
    (package / "e.py").write_text("from aded import a\n")  # imports into the circle, is not part of it
    proc = run_checker(tmp_path)
    assert proc.returncode == 1
    assert "cycle of 4 modules: aded.a, aded.b, aded.c, aded.sub.d" in proc.stdout
    assert "aded.a:3 -> aded.b (TYPE_CHECKING)" in proc.stdout
    assert "aded.b:2 -> aded.c (function-local)" in proc.stdout
    assert "aded.e" not in proc.stdout
