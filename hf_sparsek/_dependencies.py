"""The dependency range hf_sparsek supports, checked once at import with a message that says what to install.

The range is the one CI tests at both ends (.ci/run): transformers 5.17.0 (the GPU image's) with Triton 3.6.0, and
the newest releases. Below 5.17 the attention-mask interface differs (5.0-5.3 call mask functions without
``q_length``); 6.x is not released yet.
"""

from __future__ import annotations

import importlib.metadata

from packaging.version import Version

TRANSFORMERS_MIN = "5.17.0"
TRANSFORMERS_BELOW = "6"
TRITON_MIN = "3.6.0"


def supported_transformers(found: str) -> bool:
    """Whether a transformers release is inside the supported range."""
    return Version(TRANSFORMERS_MIN) <= Version(found) < Version(TRANSFORMERS_BELOW)


def check_transformers() -> None:
    """Raise ImportError with the supported range when the installed transformers is outside it."""
    try:
        found = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError as exc:
        raise ImportError(
            f"hf_sparsek needs transformers>={TRANSFORMERS_MIN},<{TRANSFORMERS_BELOW}; none is installed "
            f"(pip install 'transformers>={TRANSFORMERS_MIN},<{TRANSFORMERS_BELOW}')"
        ) from exc
    if not supported_transformers(found):
        raise ImportError(
            f"hf_sparsek supports transformers>={TRANSFORMERS_MIN},<{TRANSFORMERS_BELOW}; found {found} "
            f"(pip install 'transformers>={TRANSFORMERS_MIN},<{TRANSFORMERS_BELOW}')"
        )


check_transformers()  # on import, before any module of ours touches transformers
