"""Registers "sparsek" with transformers as soon as transformers' modeling code loads, without ``import hf_sparsek``.

Installed as a one-line ``hf_sparsek_autoload.pth`` in site-packages. At interpreter start it only appends a
finder to ``sys.meta_path`` (no torch or transformers import); when ``transformers.modeling_utils`` finishes
loading, it imports hf_sparsek, whose import registers the attention through transformers' public interfaces.
Set ``HF_SPARSEK_NO_AUTOLOAD=1`` to switch it off.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
from collections.abc import Callable

_TARGET = "transformers.modeling_utils"


class _RunAfterTransformers(importlib.abc.MetaPathFinder):
    """Calls ``callback`` once, right after ``transformers.modeling_utils`` (where AttentionInterface lives) loads."""

    def __init__(self, callback: Callable[[], None]) -> None:
        self.callback = callback

    def find_spec(self, fullname, path, target=None):  # noqa: D102 - importlib protocol
        if fullname != _TARGET:
            return None
        sys.meta_path.remove(self)  # fire once; the lookup below must not recurse into us
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader_exec = spec.loader.exec_module
        callback = self.callback

        def exec_module(module):
            loader_exec(module)
            callback()

        spec.loader.exec_module = exec_module
        return spec


def run_after_transformers(callback: Callable[[], None]) -> None:
    """Call ``callback`` once transformers' modeling code has loaded: now if it has, else the moment it does.

    Also used by ``import hf_sparsek`` to register "sparsek" without importing torch or transformers itself.
    """
    if _TARGET in sys.modules:
        callback()
    else:
        sys.meta_path.insert(0, _RunAfterTransformers(callback))  # ahead of the path finder, which would answer first


def _import_hf_sparsek() -> None:
    try:
        import hf_sparsek  # noqa: F401 - its import registers "sparsek"
    except Exception as exc:  # never break transformers because of us
        print(f"hf_sparsek: automatic registration failed ({exc}); `import hf_sparsek` to see why", file=sys.stderr)


def install() -> None:
    if os.environ.get("HF_SPARSEK_NO_AUTOLOAD") == "1" or _TARGET in sys.modules:
        return
    if not any(isinstance(f, _RunAfterTransformers) and f.callback is _import_hf_sparsek for f in sys.meta_path):
        run_after_transformers(_import_hf_sparsek)
