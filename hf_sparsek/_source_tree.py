"""Running from a source checkout without installing (``PYTHONPATH=<repo>``, as on the GPU machine).

pyproject's package-dir installs ``kernels/`` and ``eval/`` as ``hf_sparsek.kernels`` / ``.eval``; a plain source tree
has no such mapping, so this makes the same names importable there. Installed and editable packages already resolve
them and are left alone. (``scripts/``, the lab, is not part of the package: run it from the repository root as
``python -m scripts.<module>``.)
"""

from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType

SUBPACKAGES = ("kernels", "eval")


def map_source_subpackages(package: ModuleType) -> None:
    """Register ``<repo>/<folder>`` as ``<package>.<folder>`` for each folder that does not resolve otherwise."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(package.__file__)))
    for folder in SUBPACKAGES:
        name = f"{package.__name__}.{folder}"
        init = os.path.join(root, folder, "__init__.py")
        if name in sys.modules or not os.path.isfile(init) or importlib.util.find_spec(name) is not None:
            continue
        spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[os.path.dirname(init)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        setattr(package, folder, module)
