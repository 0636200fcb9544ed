"""The Gluon kernels run only on checked Triton releases, and a setting turns them off (no GPU needed)."""

from __future__ import annotations

import logging

import pytest
from hf_sparsek.kernels import gluon_support

import hf_sparsek


@pytest.fixture(autouse=True)
def _fresh_notice(monkeypatch):
    monkeypatch.setattr(gluon_support, "_noticed", False)
    monkeypatch.delenv(gluon_support.ENV_VARIABLE, raising=False)


def test_checked_release_allows_gluon(monkeypatch):
    monkeypatch.setattr(gluon_support, "triton_release", lambda: (3, 6))
    assert gluon_support.allowed()


def test_unchecked_release_runs_triton_with_one_notice(monkeypatch, caplog):
    monkeypatch.setattr(gluon_support, "triton_release", lambda: (3, 9))
    with caplog.at_level(logging.WARNING, logger="hf_sparsek"):
        assert not gluon_support.allowed()
        assert not gluon_support.allowed()
    notices = [r for r in caplog.records if "Gluon kernels were checked on Triton 3.6" in r.getMessage()]
    assert len(notices) == 1 and "Triton 3.9 found" in notices[0].getMessage()


def test_force_and_off_environment(monkeypatch):
    monkeypatch.setattr(gluon_support, "triton_release", lambda: (3, 9))
    monkeypatch.setenv(gluon_support.ENV_VARIABLE, "force")
    assert gluon_support.allowed()
    monkeypatch.setattr(gluon_support, "triton_release", lambda: (3, 6))
    monkeypatch.setenv(gluon_support.ENV_VARIABLE, "0")
    assert not gluon_support.allowed()
    monkeypatch.setenv(gluon_support.ENV_VARIABLE, "sometimes")
    with pytest.raises(ValueError, match="HF_SPARSEK_GLUON"):
        gluon_support.allowed()


def test_setting_turns_gluon_off_and_back(monkeypatch):
    monkeypatch.setattr(gluon_support, "triton_release", lambda: (3, 6))
    with hf_sparsek.settings(gluon=False):
        assert not gluon_support.allowed()
    assert gluon_support.allowed()
    with pytest.raises(ValueError, match="gluon must be a bool"):
        hf_sparsek.set_settings(gluon="no")
