"""The kernels' run-time options: one frozen object holding every switch the lab and the user may change.

``hf_sparsek.set_settings(kernels=KernelOptions(...))`` (or ``hf_sparsek.settings(kernels=...)`` for a block) makes
them current; ``hf_sparsek.triton_ops`` hands them to ``kernels/dispatch.py``, the one place that turns them into
launch choices. The defaults are the shipped choices; why each value was picked, with the measurements:
docs/kernel-decisions.md. This module imports no Triton (``hf_sparsek.runtime`` carries an instance).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType

AUTOTUNE_ENV = "HF_SPARSEK_AUTOTUNE"


def autotune_from_env() -> bool:
    """``HF_SPARSEK_AUTOTUNE=1`` turns runtime tuning on (the default of :attr:`KernelOptions.autotune`)."""
    return os.environ.get(AUTOTUNE_ENV, "0") not in ("", "0")


def _table(values: dict) -> Mapping:
    return field(default_factory=lambda: MappingProxyType(dict(values)))


_BOOLS = ("gluon_fwd", "gluon_fwd_persistent", "gluon_dkdv", "gluon_dq", "concurrent_dq", "dq_first",
          "dkdv_tma_rows", "autotune", "eager_fast_path", "split_kv_decode")
_OPTIONAL_BOOLS = ("gluon_dq_persistent", "tma")
_POSITIVE_INTS = ("gluon_dkdv_floor_exempt_row_tiles", "gluon_dq_block_n", "gluon_dq_q_slots", "split_imbalance",
                  "decode_programs_per_sm", "split_kv_max_rows", "split_kv_sms_per_program")
_OPTIONAL_POSITIVE_INTS = ("gluon_fwd_stages", "gluon_fwd_q_slots", "split_chunk")
_TABLES = ("gluon_dkdv_min_programs", "gluon_dkdv_stages", "gluon_dq_stages")


@dataclass(frozen=True)
class KernelOptions:
    """How the kernels run (never what they compute: every choice gives the same results).

    Gluon forward (Hopper): ``gluon_fwd`` may run; ``gluon_fwd_stages`` K/V ring depth (None: 3 for rows of at
    least ``LONG_ROW_TILES`` tiles, else 2); ``gluon_fwd_persistent`` one program per SM walks the work items (False:
    one program per item); ``gluon_fwd_q_slots`` query tiles in shared memory (None: 2 where they fit beside the
    ring, else 1).

    Gluon backward (Hopper): ``gluon_dkdv`` / ``gluon_dq`` may run; ``gluon_dkdv_min_programs`` fewest dK/dV programs
    (batch x KV heads x key tiles) per head dim -- short grids of short rows are bound by host time, which the Triton
    kernels' launches take less of -- except grids whose longest query row lists at least
    ``gluon_dkdv_floor_exempt_row_tiles`` tiles (GPU-bound); ``gluon_dkdv_stages`` query/dO ring depth per head dim;
    ``gluon_dq_block_n`` keys per dQ step; ``gluon_dq_stages`` dQ K/V ring depth per (head dim, keys per step);
    ``gluon_dq_head_dims`` head dims the Gluon dQ takes (at 64 it was slower than the Triton dQ on sparse layouts);
    ``gluon_dq_q_slots`` query + dO slots (2 needs a 3-slot ring at head dim 128); ``gluon_dq_persistent`` None:
    persistent grid for rows under ``LONG_ROW_TILES`` tiles (its programs hold every SM, so on long rows dK/dV could
    no longer run beside it), True / False: always / never.

    Triton backward: ``split_chunk`` entries per dK/dV program before a key tile's list is split (None: automatic);
    ``split_imbalance`` split only when the longest list is this many times the typical one (3 splits the sink column
    of 16K sink+window rows); ``concurrent_dq`` dQ on
    a side CUDA stream beside dK/dV; ``dq_first`` which of the two is launched first; ``dkdv_tma_rows`` the dK/dV
    kernel loads query, dO, LSE and delta rows through TMA.

    Both: ``tma`` None automatic (CUDA, compute capability >= 9, 16-bit, head dim 64/128, aligned), True / False
    force (True still needs alignment; the interpreter runs it too, for tests); ``autotune`` time the launch-config
    candidates once per shape class (default: ``HF_SPARSEK_AUTOTUNE``); ``eager_fast_path`` eager calls skip the
    custom op's Python dispatch (host time), torch.compile still sees the op.

    Decode (query runs without gradients): ``split_kv_decode`` runs the split-KV kernel (kernels/decode.py; False:
    the forward kernel, one program per query tile and KV head) for runs of at most 16 rows, and for runs of up to
    ``split_kv_max_rows`` (at most the kernel's 64) where the forward kernel would have few programs: batch x KV
    heads x query tiles times ``split_kv_sms_per_program`` at most the SMs (``dispatch.use_split_kv``);
    ``decode_programs_per_sm`` how many programs per SM the split count aims for.
    """

    gluon_fwd: bool = True
    gluon_fwd_stages: int | None = None
    gluon_fwd_persistent: bool = True
    gluon_fwd_q_slots: int | None = None
    gluon_dkdv: bool = True
    gluon_dq: bool = True
    gluon_dkdv_min_programs: Mapping[int, int] = _table({64: 512, 128: 512})
    gluon_dkdv_floor_exempt_row_tiles: int = 24
    gluon_dkdv_stages: Mapping[int, int] = _table({64: 4, 128: 3})
    gluon_dq_block_n: int = 64
    gluon_dq_stages: Mapping[tuple[int, int], int] = _table({(64, 64): 4, (128, 64): 4, (64, 128): 3, (128, 128): 2})
    gluon_dq_head_dims: tuple[int, ...] = (128,)
    gluon_dq_q_slots: int = 1
    gluon_dq_persistent: bool | None = None
    split_chunk: int | None = None
    split_imbalance: int = 3
    concurrent_dq: bool = True
    dq_first: bool = True
    dkdv_tma_rows: bool = True
    tma: bool | None = None
    autotune: bool = field(default_factory=autotune_from_env)
    eager_fast_path: bool = True
    split_kv_decode: bool = True
    decode_programs_per_sm: int = 4
    split_kv_max_rows: int = 64
    split_kv_sms_per_program: int = 4

    def __post_init__(self) -> None:
        for name in _BOOLS + _OPTIONAL_BOOLS:
            value = getattr(self, name)
            if not isinstance(value, bool) and not (value is None and name in _OPTIONAL_BOOLS):
                raise ValueError(f"KernelOptions.{name} must be a bool{' or None' * (name in _OPTIONAL_BOOLS)}, "
                                 f"got {value!r}")
        for name in _POSITIVE_INTS + _OPTIONAL_POSITIVE_INTS:
            value = getattr(self, name)
            if value is None and name in _OPTIONAL_POSITIVE_INTS:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"KernelOptions.{name} must be a positive int"
                                 f"{' or None' * (name in _OPTIONAL_POSITIVE_INTS)}, got {value!r}")
        if not 16 <= self.split_kv_max_rows <= 64:
            raise ValueError(f"KernelOptions.split_kv_max_rows must lie in 16..64 (the split-KV kernel's runs), got "
                             f"{self.split_kv_max_rows!r}")
        for name in _TABLES:
            value = getattr(self, name)
            if not isinstance(value, Mapping):
                raise ValueError(f"KernelOptions.{name} must be a mapping, got {value!r}")
            object.__setattr__(self, name, MappingProxyType(dict(value)))  # a frozen copy: no change behind our back
        object.__setattr__(self, "gluon_dq_head_dims", tuple(self.gluon_dq_head_dims))

    def without_gluon(self) -> KernelOptions:
        """These options with every Gluon kernel off (``hf_sparsek.set_settings(gluon=False)``)."""
        return replace(self, gluon_fwd=False, gluon_dkdv=False, gluon_dq=False)

    def record(self) -> dict:
        """The options as JSON-ready data for results files (tables keyed ``"128"`` or ``"128x64"``)."""
        def key(k: object) -> str:
            return "x".join(map(str, k)) if isinstance(k, tuple) else str(k)

        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Mapping):
                value = {key(k): v for k, v in value.items()}
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out
