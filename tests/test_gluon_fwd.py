"""The Gluon forward (kernels/attention_fwd_gluon.py): which inputs it takes, and its Hopper machine code.

Gluon has no CPU interpreter, so its results are checked against the reference on the GPU
(scripts/gpu_gluon_fwd.py, scripts/gpu_kernels.py); here CI compiles it for sm_90 and checks what makes it fast and
safe: warp-specialised (register reallocation between loader and consumers), no CTA-wide barrier in the loop (the
two consumer warpgroups run unsynchronised), the scores waited for apart from the P.V product, no spill traffic in
the steady-state loop, and shared memory within the H100's 227 KiB for both ring depths.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")
from hf_sparsek.kernels import attention_fwd_gluon as gluon_fwd  # noqa: E402
from hf_sparsek.kernels import dispatch  # noqa: E402
from hf_sparsek.kernels.options import KernelOptions  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
H100_SMEM = 232448  # bytes of shared memory one block may use on sm_90


def _qkv(dtype=torch.bfloat16, dim=128, device="cpu"):
    q = torch.randn(1, 4, 256, dim, dtype=dtype, device=device)
    k = torch.randn(1, 2, 256, dim, dtype=dtype, device=device)
    return q, k, k.clone()


def test_not_supported_off_gpu():
    q, k, v = _qkv()
    # CPU tensors: the Triton kernel / reference runs
    assert not dispatch.use_gluon_forward(q, k, v, 128, 0.0, False, KernelOptions())


@pytest.mark.parametrize("change, expect", [
    ({}, None),
    ({"dtype": torch.float16}, None),
    ({"head_dim": 64}, None),
    ({"dtype": torch.float32}, "dtype"),
    ({"head_dim": 256}, "head dim 256"),
    ({"block": 64}, "block size 64"),
    ({"softcap": 30.0}, "soft-capping"),
    ({"has_segments": True}, "segments"),
    ({"q_len": 1}, "query length 1"),
])
def test_which_inputs_take_the_gluon_forward(change, expect):
    args = dict(dtype=torch.bfloat16, head_dim=128, q_len=4096, block=128, softcap=0.0, has_segments=False)
    reason = dispatch.gluon_forward_reason(**{**args, **change})
    if expect is None:
        assert reason is None
    else:
        assert reason is not None and expect in reason


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_switch_off_sends_everything_to_triton():
    q, k, v = _qkv(device="cuda")
    assert not dispatch.use_gluon_forward(q, k, v, 128, 0.0, False, KernelOptions(gluon_fwd=False))


def test_ring_depth_is_checked():
    q, k, v = _qkv()
    counts = torch.ones(1, 1, 2, dtype=torch.int32)
    tiles = torch.zeros(1, 1, 2, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="ring depth 4"):
        gluon_fwd.attention_forward_gluon(q, k, v, counts, tiles, counts, tiles, 128, 0, 0, 0, 0, 0.1, stages=4,
                                          q_slots=None, persistent=True)


def test_query_slots_follow_shared_memory():
    assert gluon_fwd.slots_for(128, 128, 34) == (2, 2)  # short rows: 2-slot ring, room for a second query tile
    assert gluon_fwd.slots_for(128, 128, 512) == (3, 1)  # long rows: 3-slot ring fills shared memory
    assert gluon_fwd.slots_for(64, 128, 512) == (3, 2)
    with pytest.raises(ValueError, match="2 query slots and a 3-slot ring at head dim 128"):
        gluon_fwd.slots_for(128, 128, 512, q_slots=2)


@pytest.mark.skipif(not gluon_fwd.AVAILABLE, reason="this Triton has no Gluon")
@pytest.mark.skipif(not os.path.exists(_TOOLS), reason="Triton without its NVIDIA backend tools")
def test_hopper_code_is_warp_specialised_and_overlapped(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-m", "scripts.sass_report", "--kernels", "gluon_fwd", "--dims", "128,64",
                    "--out", str(tmp_path)], check=True, env=env, capture_output=True, cwd=ROOT)
    with open(tmp_path / "sass_report.json") as f:
        rows = json.load(f)["kernels"]
    assert len(rows) == 4  # head dims 128 and 64, ring depths 2 and 3
    for row in rows:
        assert row["setmaxnreg"], row["kernel"]  # loader and consumers in their own partitions
        assert row["cta_barriers"] == 0, row["kernel"]  # consumers synchronise through mbarriers only
        assert row["wgmma_wait_1"], row["kernel"]  # softmax of tile j while P.V of tile j-1 runs
        assert not row["wgmma_serialised_warning"], row["kernel"]
        # the persistent loop's per-item arguments may spill (a few words, reloaded once per work item at D=128);
        # the steady-state loops (scores waited for apart from P.V: two waits) carry at most one reload per tile
        assert row["spill_store_bytes"] <= 96, row["kernel"]  # 84 with Triton 3.6's interval masks (2-slot ring)
        steady = [loop for loop in row["mma_loops"] if loop["wgmma_waits"] == 2]
        assert steady and all(loop["local_memory"] <= 1 for loop in steady), row["kernel"]
        assert 0 < row["shared_bytes"] <= H100_SMEM, row["kernel"]
        # with the Tritons whose sparse-row loop (2-slot ring, head dim 128) has its softmax in a block of its own,
        # the exponentials run while this warpgroup's P.V is in flight (in the plain loop Triton 3.6's ptxas waits
        # for P.V first: docs/kernel-decisions.md)
        if gluon_fwd._SOFTMAX_OWN_BLOCK and " ring 2 " in row["kernel"] and "D128" in row["kernel"]:
            assert all(loop["exp_before_last_wait"] >= 64 for loop in steady), row["kernel"]
        assert row["tma_loads"] == 3  # Q, K and V through TMA
