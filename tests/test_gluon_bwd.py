"""The Gluon dK/dV kernel (kernels/attention_bwd_gluon.py): which inputs it takes, and its Hopper machine code.

Gluon has no CPU interpreter, so its gradients are checked against the reference on the GPU
(scripts/gpu_gluon_bwd.py: 14 cases, and bit-identical on repeat); here CI compiles it for sm_90, with and without
split key lists, and checks the structure that makes it fast: warp-specialised (register reallocation between the
loader and the consumers), no CTA-wide barrier in the loop, wgmma not serialised by ptxas (3 waits per step for 24
or 16 wgmma, no C7512/C7515 warning), the scores waited for apart from dP, six TMA loads (K, V, query rows, dO
rows, LSE, delta) and shared memory within the H100's 227 KiB.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")
from hf_sparsek.kernels import attention_bwd_gluon as gluon_bwd  # noqa: E402
from hf_sparsek.kernels import dispatch  # noqa: E402
from hf_sparsek.kernels.options import KernelOptions  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
H100_SMEM = 232448  # bytes of shared memory one block may use on sm_90


def test_not_supported_off_gpu():
    q = torch.randn(1, 4, 256, 128, dtype=torch.bfloat16)
    k = torch.randn(1, 2, 256, 128, dtype=torch.bfloat16)
    assert not dispatch.use_gluon_dkdv(q, k, k.clone(), q.clone(), 128, 0.0, False, 0, None, KernelOptions())


@pytest.mark.parametrize("change, expect", [
    ({}, None),
    ({"dtype": torch.float16}, None),
    ({"head_dim": 64}, None),
    ({"q_offset": 1796}, None),
    ({"dtype": torch.float32}, "dtype"),
    ({"head_dim": 256}, "head dim 256"),
    ({"block": 64}, "block size 64"),
    ({"softcap": 30.0}, "soft-capping"),
    ({"has_segments": True}, "segments"),
    ({"q_offset": 1798}, "query offset 1798"),
    ({"programs": 256}, "256 key-tile programs < 512 at head dim 128"),
    ({"programs": 511, "head_dim": 64}, "511 key-tile programs < 512 at head dim 64"),
    ({"programs": 512}, None),
    ({"programs": 512, "head_dim": 64}, None),
    ({"programs": 256, "row_tiles": 8}, "rows of 8 < 24 tiles"),  # 4K random 10%: host-bound, Triton kernels
    ({"programs": 256, "row_tiles": 23}, "256 key-tile programs"),
    ({"programs": 256, "row_tiles": 24}, None),  # 4K dense causal (32-tile rows): GPU-bound, Gluon kernels
    ({"programs": 256, "row_tiles": 32, "head_dim": 64}, None),
    ({"programs": 256, "row_tiles": 32, "softcap": 30.0}, "soft-capping"),  # the exemption is the floor's only
])
def test_which_inputs_take_the_gluon_dkdv(change, expect):
    args = dict(dtype=torch.bfloat16, head_dim=128, block=128, softcap=0.0, has_segments=False, q_offset=0,
                programs=1024)
    reason = dispatch.gluon_dkdv_reason(**{**args, **change}, options=KernelOptions())
    if expect is None:
        assert reason is None
    else:
        assert reason is not None and expect in reason


def test_the_grid_floor_is_an_option():
    """The options reach the rule: a lower floor or a lower exemption lets the 4K sparse grid take the Gluon dK/dV."""
    args = dict(dtype=torch.bfloat16, head_dim=128, block=128, softcap=0.0, has_segments=False, q_offset=0,
                programs=256, row_tiles=8)
    assert "256 key-tile programs < 512" in dispatch.gluon_dkdv_reason(**args, options=KernelOptions())
    assert dispatch.gluon_dkdv_reason(**args, options=KernelOptions(gluon_dkdv_min_programs={128: 256})) is None
    assert dispatch.gluon_dkdv_reason(**args, options=KernelOptions(gluon_dkdv_floor_exempt_row_tiles=8)) is None


@pytest.mark.parametrize("row_tiles, persistent, expect", [
    (34, None, 132),  # sparse rows (64K sink+window): one program per SM
    (95, None, 132),
    (96, None, 4096),  # long rows (dense causal): one program per item, so dK/dV can run beside dQ
    (512, None, 4096),
    (512, True, 132),
    (34, False, 4096),
])
def test_dq_grid_follows_row_length(row_tiles, persistent, expect):
    assert gluon_bwd.dq_grid_size(4096, row_tiles, 132, persistent) == expect
    assert gluon_bwd.dq_grid_size(100, row_tiles, 132, persistent) == 100  # fewer items than SMs: one program each


def test_dq_launch_arguments_are_checked():
    q = torch.randn(1, 2, 128, 128, dtype=torch.bfloat16)
    kv = q[:, :1].clone()
    counts = torch.ones(1, 1, 1, dtype=torch.int32)
    tiles = torch.zeros(1, 1, 1, 1, dtype=torch.int32)
    stats = torch.zeros(1, 2, 128)
    args = (q, kv, kv, q, stats, stats)
    rest = (counts, tiles, counts, tiles, 128, 0, 0, 0, 0, 0.1)
    shipped = dict(block_n=64, stages=4, q_slots=1, persistent=None)
    with pytest.raises(ValueError, match="q's strides"):
        gluon_bwd.attention_dq_gluon(*args, q.transpose(1, 2).contiguous().transpose(1, 2), *rest, **shipped)
    with pytest.raises(ValueError, match="key tile 48"):
        gluon_bwd.attention_dq_gluon(*args, torch.empty_like(q), *rest, **{**shipped, "block_n": 48, "stages": 2})


@pytest.mark.parametrize("q_len, dim, options, expect", [
    (16, 128, KernelOptions(), True),
    (15, 128, KernelOptions(), False),
    (4096, 64, KernelOptions(), False),
    (4096, 64, KernelOptions(gluon_dq_head_dims=(64, 128)), True),
    (4096, 128, KernelOptions(gluon_dq=False), False),
])
def test_dq_rules_on_top_of_the_dkdv_rules(monkeypatch, q_len, dim, options, expect):
    """The Gluon dQ adds its own rules (query length >= 16, the options' head dims and switch) to what the dK/dV
    kernel takes; the dK/dV rule is stubbed to True so these rules themselves are tested on CPU."""
    monkeypatch.setattr(dispatch, "use_gluon_dkdv", lambda *args, **kwargs: True)
    q = torch.randn(1, 2, q_len, dim, dtype=torch.bfloat16)
    kv = torch.randn(1, 1, 64, dim, dtype=torch.bfloat16)
    assert dispatch.use_gluon_dq(q, kv, kv, q, 128, 0.0, False, None, options) is expect


def test_ring_depth_is_checked():
    q = torch.randn(1, 2, 128, 64, dtype=torch.bfloat16)
    counts = torch.ones(1, 1, 1, dtype=torch.int32)
    tiles = torch.zeros(1, 1, 1, 1, dtype=torch.int32)
    stats = torch.zeros(1, 2, 128)
    with pytest.raises(ValueError, match="ring depth 1"):
        gluon_bwd.attention_dkdv_gluon(q, q[:, :1], q[:, :1], q, stats, stats, q[:, :1], q[:, :1], counts, tiles,
                                       counts, tiles, None, None, None, None, 128, 0, 0, 0, 0, 0.1, stages=1)


@pytest.mark.skipif(not gluon_bwd.AVAILABLE, reason="this Triton has no Gluon")
@pytest.mark.skipif(not os.path.exists(_TOOLS), reason="Triton without its NVIDIA backend tools")
def test_hopper_code_is_warp_specialised_and_not_serialised(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-m", "scripts.sass_report", "--kernels", "gluon_dkdv,gluon_dq", "--dims",
                    "128,64", "--out", str(tmp_path)], check=True, env=env, capture_output=True, cwd=ROOT)
    with open(tmp_path / "sass_report.json") as f:
        rows = json.load(f)["kernels"]
    dq_rows = [r for r in rows if f"keys {KernelOptions().gluon_dq_block_n} " in r["kernel"]]  # the shipped key step
    assert len(dq_rows) == 4  # head dims 128 and 64; one and two query/dO slots
    for row in dq_rows:
        name = row["kernel"]
        assert row["setmaxnreg"] and row["cta_barriers"] == 0 and row["wgmma_wait_1"], name
        assert not row["wgmma_serialised_warning"] and row["spill_store_bytes"] == 0, name
        loop = row["mma_loops"][0]  # S and dP (K = head dim), dS.K (K = 64 keys): 16 + 4 or 8 + 4 wgmma, 2 waits
        assert loop["hgmma"] == (20 if "D128" in name else 12) and loop["wgmma_waits"] == 2, (name, loop)
        assert 0 < row["shared_bytes"] <= H100_SMEM, name
    rows = [r for r in rows if "dkdv" in r["kernel"]]
    assert len(rows) == 4  # head dims 128 and 64, unsplit and split lists
    for row in rows:
        name = row["kernel"]
        assert row["setmaxnreg"], name  # loader and consumers in their own partitions
        assert row["cta_barriers"] == 0, name  # consumers synchronise through mbarriers only
        assert row["wgmma_wait_1"], name  # scores waited for while dP^T is still in flight
        assert not row["wgmma_serialised_warning"], name
        loop = row["mma_loops"][0]
        assert loop["hgmma"] == (24 if "D128" in name else 16) and loop["wgmma_waits"] == 3, (name, loop)
        assert 0 < row["shared_bytes"] <= H100_SMEM, name
        assert row["tma_loads"] == 6, name  # K, V, query rows, dO rows, LSE, delta
