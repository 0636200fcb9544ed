"""Named patterns for one-line use: ``hf_sparsek.set_pattern(model, "sink128-window4096")``."""

from __future__ import annotations

from .patterns import BlockLayout, SparsePattern

PRESETS: dict[str, SparsePattern] = {
    "dense": SparsePattern(),
    "sink128-window1024": SparsePattern(sink_tokens=128, window=1024),
    "sink128-window2048": SparsePattern(sink_tokens=128, window=2048),
    "sink128-window4096": SparsePattern(sink_tokens=128, window=4096),
    "strided8-window1024": SparsePattern(window=1024, layout=BlockLayout("strided", stride=8)),
    "random10": SparsePattern(layout=BlockLayout("random", density=0.1, seed=0)),
    "topk8-sink128-window1024": SparsePattern(sink_tokens=128, window=1024, topk_blocks=8),
}
