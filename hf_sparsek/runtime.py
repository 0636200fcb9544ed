"""Process-wide runtime settings: which backend runs sparse layers, whether dense work goes to torch SDPA, and the
kernels' options."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

from ._source_tree import map_source_subpackages

# A plain source checkout resolves hf_sparsek.kernels only once mapped; the package's __init__ maps it after this
# module is imported, so map it here first (a no-op when installed or already mapped).
map_source_subpackages(sys.modules[__package__])
from .kernels.options import KernelOptions  # noqa: E402 - imports no Triton

_BACKENDS = ("auto", "triton", "reference")


@dataclass(frozen=True)
class RuntimeSettings:
    """``backend``: "auto" | "triton" | "reference" for sparse layers.
    ``dense_via_sdpa``: dense layers (and sequences under ``min_sparse_len``) run torch SDPA; False forces them
    through the sparse code with a dense pattern (tests use this to compare the two paths).
    ``gluon``: the Gluon kernels may run where they apply (Hopper, checked Triton releases); False runs the Triton
    kernels everywhere (same results), whatever ``kernels`` says.
    ``kernels``: how the kernels run (``hf_sparsek.kernels.options.KernelOptions``: Gluon, splits, streams, TMA,
    autotuning); never what they compute.
    """

    backend: str = "auto"
    dense_via_sdpa: bool = True
    gluon: bool = True
    kernels: KernelOptions = field(default_factory=KernelOptions)

    def __post_init__(self) -> None:
        if self.backend not in _BACKENDS:
            raise ValueError(f"backend={self.backend!r}; supported: {_BACKENDS}")
        if not isinstance(self.dense_via_sdpa, bool):
            raise ValueError(f"dense_via_sdpa must be a bool, got {self.dense_via_sdpa!r}")
        if not isinstance(self.gluon, bool):
            raise ValueError(f"gluon must be a bool, got {self.gluon!r}")
        if not isinstance(self.kernels, KernelOptions):
            raise ValueError(f"kernels must be a KernelOptions, got {self.kernels!r}")


_current = RuntimeSettings()
_kernel_options = _current.kernels


def get_settings() -> RuntimeSettings:
    return _current


def kernel_options() -> KernelOptions:
    """The options the kernels run with now: ``kernels`` with the Gluon kernels off where ``gluon`` is False (made
    once per settings change: the kernel wrappers ask on every call)."""
    return _kernel_options


def _apply(new: RuntimeSettings) -> None:
    global _current, _kernel_options
    _current = new
    _kernel_options = new.kernels if new.gluon else new.kernels.without_gluon()


def set_settings(**changes: object) -> RuntimeSettings:
    """Change settings for the rest of the process; returns the previous ones."""
    previous = _current
    _apply(replace(_current, **changes))
    return previous


@contextlib.contextmanager
def settings(**changes: object) -> Iterator[RuntimeSettings]:
    """``with hf_sparsek.settings(backend="reference"): ...`` changes settings inside the block only."""
    previous = set_settings(**changes)
    try:
        yield _current
    finally:
        _apply(previous)
