"""The Gluon kernels run only on checked Triton releases, and the settings turn them off (no GPU needed)."""

from __future__ import annotations

import logging

import pytest
from hf_sparsek.kernels import gluon_support
from hf_sparsek.kernels.options import KernelOptions

import hf_sparsek
from hf_sparsek.runtime import kernel_options


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


def gluon_switches(options: KernelOptions) -> tuple[bool, bool, bool]:
    return options.gluon_fwd, options.gluon_dkdv, options.gluon_dq


def test_setting_turns_gluon_off_and_back():
    assert gluon_switches(kernel_options()) == (True, True, True)
    with hf_sparsek.settings(gluon=False):
        assert gluon_switches(kernel_options()) == (False, False, False)
        assert hf_sparsek.get_settings().kernels == KernelOptions()  # the chosen options stay as they were
    assert gluon_switches(kernel_options()) == (True, True, True)
    with pytest.raises(ValueError, match="gluon must be a bool"):
        hf_sparsek.set_settings(gluon="no")


def test_kernel_options_are_settings():
    """``settings(kernels=...)`` makes options current for a block; bad values are refused with the field's name."""
    with hf_sparsek.settings(kernels=KernelOptions(split_imbalance=4, gluon_dq_head_dims=[64, 128])):
        assert kernel_options().split_imbalance == 4 and kernel_options().gluon_dq_head_dims == (64, 128)
        with hf_sparsek.settings(gluon=False):
            assert kernel_options().split_imbalance == 4 and not kernel_options().gluon_dq
    assert kernel_options() == KernelOptions()
    with pytest.raises(ValueError, match="kernels must be a KernelOptions"):
        hf_sparsek.set_settings(kernels={"tma": True})
    with pytest.raises(ValueError, match="split_chunk must be a positive int or None"):
        KernelOptions(split_chunk=0)
    with pytest.raises(ValueError, match="tma must be a bool or None"):
        KernelOptions(tma="yes")
    with pytest.raises(TypeError):
        KernelOptions().gluon_dkdv_stages[128] = 2  # frozen tables: no change behind the settings' back
