"""The kernels' Hopper machine code, compiled on CPU: the dK/dV kernel keeps its wgmma asynchronous.

Checks the installed Triton's code for sm_90: wgmma not serialised (with Triton 3.6, the GPU image's version, an
earlier two-loop form of this kernel made ptxas wait after every wgmma, warning C7515; Triton 3.9 did not) and the
query/dO/LSE/delta rows loaded through TMA. Runs ``python -m scripts.sass_report`` in a fresh process (other test
modules load the kernels in interpreter mode). Needs Triton's NVIDIA backend tools, which its Linux wheels ship.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
pytestmark = pytest.mark.skipif(not os.path.exists(_TOOLS), reason="Triton without its NVIDIA backend tools")


def test_dkdv_kernel_wgmma_asynchronous_and_rows_through_tma(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-m", "scripts.sass_report", "--kernels", "dkdv", "--dims", "128", "--out",
                    str(tmp_path)], check=True, env=env, capture_output=True, cwd=ROOT)
    with open(tmp_path / "sass_report.json") as f:
        (row,) = json.load(f)["kernels"]
    assert not row["wgmma_serialised_warning"]
    loop = row["mma_loops"][0]
    assert loop["hgmma"] >= 24  # four 128x64x128 products per step, in k16 wgmma instructions
    assert loop["wgmma_waits"] <= 4, loop  # a wait per wgmma would mean they run one by one
    assert row["tma_loads"] >= 4  # query, dO, LSE and delta rows through TMA
    assert row["registers"] > 0
