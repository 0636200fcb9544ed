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

_TARGET = "transformers.modeling_utils"


class _RegisterAfterTransformers(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):  # noqa: D102 - importlib protocol
        if fullname != _TARGET:
            return None
        sys.meta_path.remove(self)  # fire once; the lookup below must not recurse into us
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader_exec = spec.loader.exec_module

        def exec_module(module):
            loader_exec(module)
            try:
                import hf_sparsek  # noqa: F401 - registers "sparsek"
            except Exception as exc:  # never break transformers because of us
                print(f"hf_sparsek: automatic registration failed ({exc}); `import hf_sparsek` to see why",
                      file=sys.stderr)

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    if os.environ.get("HF_SPARSEK_NO_AUTOLOAD") == "1" or _TARGET in sys.modules:
        return
    if not any(isinstance(f, _RegisterAfterTransformers) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterTransformers())  # ahead of the path finder, which would answer first
