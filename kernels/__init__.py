"""hf_sparsek's Triton/Gluon kernels, installed as ``hf_sparsek.kernels`` (no transformers imports here).

Why this file may hand itself over: the folder sits at the repository root, and Hugging Face's ``kernels`` package
(which transformers >= 5.25 imports when a model module loads) has the same top-level name. Wherever the repository
root is on ``sys.path`` -- ``python`` or ``python -m pytest`` started there, a notebook there, ``PYTHONPATH=<repo>``
-- a plain ``import kernels`` would find this folder first and transformers would break
(``cannot import name 'CUDAProperties' from 'kernels'``). So when this file is imported under the top-level name
``kernels`` (never the case for ``hf_sparsek.kernels``), it finds the real ``kernels`` on the rest of ``sys.path``,
loads it and puts it in ``sys.modules`` in its place; without one it stands in as an empty namespace package.
tests/test_import_shadowing.py fails if the shadowing comes back.
"""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys
    import types

    def _same_dir(entry: str, folder: str) -> bool:
        return os.path.realpath(os.path.abspath(entry or os.curdir)) == folder

    _repo_root = os.path.realpath(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    _elsewhere = [entry for entry in sys.path if isinstance(entry, str) and not _same_dir(entry, _repo_root)]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is None or _spec.loader is None:
        # No other `kernels` installed: stand in as an empty PEP 420 namespace package (no __file__, no
        # __version__), which is what a folder that merely shares the name is to transformers' availability check
        # (it imports the package when no metadata is found, and then reads it as "not installed").
        _module = types.ModuleType("kernels")
        _module.__path__ = []
    else:
        _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module  # the import system returns what sys.modules holds once this file ends
    if _spec is not None and _spec.loader is not None:
        _spec.loader.exec_module(_module)
