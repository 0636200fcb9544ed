"""Whether the Gluon kernels may run: only on the Triton releases they were checked on, unless switched off.

Gluon (``triton.experimental.gluon``) is an experimental API: its semantics and code generation change between
Triton releases, so a release the Gluon kernels were not checked on (``scripts/gpu_gluon_fwd.py`` /
``gpu_gluon_bwd.py`` on a Hopper GPU) gets the Triton kernels, which compute the same results, with a one-time
notice. ``HF_SPARSEK_GLUON``: ``0`` never, ``force`` on any release (to check a new one), unset or ``1`` on the
checked releases only. ``kernels/dispatch.py`` asks here before it picks a Gluon kernel; the run-time switches
(``hf_sparsek.set_settings(gluon=False)``, ``KernelOptions.gluon_*``) are the options it is given.
"""

from __future__ import annotations

import logging
import os

# (major, minor) Triton releases the Gluon forward and backward were checked on (H100/H200 images: 3.6.0).
CHECKED_TRITON_RELEASES: tuple[tuple[int, int], ...] = ((3, 6),)
ENV_VARIABLE = "HF_SPARSEK_GLUON"
_ENV_CHOICES = ("0", "1", "force")

logger = logging.getLogger("hf_sparsek")
_noticed = False


def triton_release() -> tuple[int, int] | None:
    """(major, minor) of the installed Triton, None without one."""
    try:
        import triton
    except ImportError:
        return None
    major, minor = triton.__version__.split(".")[:2]
    return int(major), int(minor)


def _env_choice() -> str:
    choice = os.environ.get(ENV_VARIABLE, "1").strip().lower() or "1"
    if choice not in _ENV_CHOICES:
        raise ValueError(f"{ENV_VARIABLE}={choice!r}; supported: {', '.join(_ENV_CHOICES)}")
    return choice


def allowed() -> bool:
    """True when the environment and the installed Triton release let a Gluon kernel run; logs a notice once when
    the release is unchecked."""
    global _noticed
    choice = _env_choice()
    if choice == "0":
        return False
    if choice == "force":
        return True
    release = triton_release()
    if release in CHECKED_TRITON_RELEASES:
        return True
    if not _noticed:
        _noticed = True
        checked = ", ".join(f"{a}.{b}" for a, b in CHECKED_TRITON_RELEASES)
        found = "none" if release is None else f"{release[0]}.{release[1]}"
        logger.warning(
            "hf_sparsek: the Gluon kernels were checked on Triton %s only; Triton %s found, so the Triton kernels run "
            "(same results; %s=force runs Gluon anyway)", checked, found, ENV_VARIABLE,
        )
    return False
