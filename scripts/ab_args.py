"""Command-line options of the A/B experiments that load an earlier module beside the current one.

Parsed before torch or the kernels are imported: ``--cpu-smoke`` must set ``TRITON_INTERPRET`` first (``@triton.jit``
picks its mode at import), so this module imports nothing heavy.
"""

from __future__ import annotations

import argparse
import os


def baseline_args(description: str, baseline_help: str, default_out: str) -> argparse.Namespace:
    """``--baseline`` (folder of the earlier module), ``--out`` (``$OUT`` or ``default_out``) and ``--cpu-smoke``
    (tiny sizes under Triton's interpreter, which this sets)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--baseline", required=True, help=baseline_help)
    ap.add_argument("--out", default=os.environ.get("OUT", default_out))
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes, Triton interpreter")
    args = ap.parse_args()
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    return args
