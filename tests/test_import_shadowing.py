"""Our top-level ``kernels/`` folder never shadows Hugging Face's ``kernels`` (which transformers imports).

Each case starts a fresh interpreter the way a user would: from the repository root (cwd on ``sys.path``), with the
root on ``PYTHONPATH`` from elsewhere, and under ``python -m pytest``-style path insertion.
"""

from __future__ import annotations

import importlib.metadata
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _has_hf_kernels() -> bool:
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


HF_KERNELS = _has_hf_kernels()

WHICH_KERNELS = (
    "import kernels, hf_sparsek.kernels as ours; "
    "print(kernels.__file__); print(ours.__file__); print(ours is not kernels)"
)
TRANSFORMERS_HUB = (
    "import transformers.integrations.hub_kernels as h, kernels; print(kernels.__file__)"
)


def _run(code: str, cwd: pathlib.Path, pythonpath: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


PLACES = {
    "cwd-repo-root": (ROOT, None),
    "pythonpath-repo-root": (ROOT / "tests", str(ROOT)),
    "pythonpath-dot-at-root": (ROOT, "."),
}


@pytest.mark.skipif(not HF_KERNELS, reason="Hugging Face's kernels package is not installed in this environment")
@pytest.mark.parametrize("place", list(PLACES))
def test_import_kernels_gets_hugging_faces_package(place):
    cwd, pythonpath = PLACES[place]
    result = _run(WHICH_KERNELS, cwd, pythonpath)
    assert result.returncode == 0, result.stderr
    theirs, ours, distinct = result.stdout.split()
    assert "site-packages" in theirs and not theirs.startswith(str(ROOT / "kernels")), theirs
    assert ours == str(ROOT / "kernels" / "__init__.py")
    assert distinct == "True"


@pytest.mark.skipif(not HF_KERNELS, reason="Hugging Face's kernels package is not installed in this environment")
def test_transformers_hub_kernels_imports_from_repo_root():
    result = _run(TRANSFORMERS_HUB, ROOT)
    assert result.returncode == 0, result.stderr
    assert not result.stdout.strip().startswith(str(ROOT / "kernels")), result.stdout


@pytest.mark.skipif(HF_KERNELS, reason="only meaningful where Hugging Face's kernels package is absent")
def test_without_hugging_faces_package_kernels_reads_as_not_installed():
    code = (
        "from transformers import AttentionInterface; import transformers.integrations.hub_kernels; import kernels; "
        "from transformers.utils.import_utils import is_kernels_available; "
        "print(getattr(kernels, '__file__', None), is_kernels_available())"
    )
    result = _run(code, ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["None", "False"]
