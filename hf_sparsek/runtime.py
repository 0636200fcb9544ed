"""Process-wide runtime settings: which backend runs sparse layers, and whether dense work goes to torch SDPA."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, replace

_BACKENDS = ("auto", "triton", "reference")


@dataclass(frozen=True)
class RuntimeSettings:
    """``backend``: "auto" | "triton" | "reference" for sparse layers.
    ``dense_via_sdpa``: dense layers (and sequences under ``min_sparse_len``) run torch SDPA; False forces them
    through the sparse code with a dense pattern (tests use this to compare the two paths).
    ``gluon``: the Gluon kernels may run where they apply (Hopper, checked Triton releases); False runs the Triton
    kernels everywhere (same results).
    """

    backend: str = "auto"
    dense_via_sdpa: bool = True
    gluon: bool = True

    def __post_init__(self) -> None:
        if self.backend not in _BACKENDS:
            raise ValueError(f"backend={self.backend!r}; supported: {_BACKENDS}")
        if not isinstance(self.dense_via_sdpa, bool):
            raise ValueError(f"dense_via_sdpa must be a bool, got {self.dense_via_sdpa!r}")
        if not isinstance(self.gluon, bool):
            raise ValueError(f"gluon must be a bool, got {self.gluon!r}")


_current = RuntimeSettings()


def get_settings() -> RuntimeSettings:
    return _current


def _apply(new: RuntimeSettings) -> None:
    """Make ``new`` current; the kernels' Gluon switch follows it (the kernels package imports nothing of ours)."""
    global _current
    _current = new
    from .kernels import gluon_support  # imports no Triton

    gluon_support.set_enabled(new.gluon)


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
