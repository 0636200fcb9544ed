"""The supported transformers range is stated once and enforced at import with a message saying what to install."""

from __future__ import annotations

import importlib.metadata
import pathlib
import re

import pytest

from hf_sparsek import _dependencies

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("found, ok", [("5.0.0", False), ("5.3.0", False), ("5.16.2", False), ("5.17.0", True),
                                       ("5.25.0", True), ("5.99.1", True), ("6.0.0", False)])
def test_range(found, ok):
    assert _dependencies.supported_transformers(found) is ok


def test_outside_the_range_import_error_names_the_range(monkeypatch):
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "5.3.0")
    with pytest.raises(ImportError, match=r"transformers>=5\.17\.0,<6; found 5\.3\.0"):
        _dependencies.check_transformers()


def test_pyproject_states_the_same_range():
    text = (ROOT / "pyproject.toml").read_text()
    assert f'"transformers>={_dependencies.TRANSFORMERS_MIN},<{_dependencies.TRANSFORMERS_BELOW}"' in text
    assert re.search(rf'"triton>={re.escape(_dependencies.TRITON_MIN)}"', text)
    ci = (ROOT / ".ci" / "run").read_text()
    assert f"transformers=={_dependencies.TRANSFORMERS_MIN}" in ci and f"triton=={_dependencies.TRITON_MIN}" in ci
