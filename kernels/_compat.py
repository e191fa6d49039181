"""Torch / Triton version shims, in one place.

The code runs on torch 2.11 (GPU machine) and 2.14 (CI). Everything used from ``torch.library``
(``custom_op``, ``register_fake``, ``register_autograd``) exists since torch 2.4; Triton is
optional and only imported when a CUDA tensor reaches the dispatch.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

if not hasattr(torch.library, "custom_op"):  # pragma: no cover - torch < 2.4
    raise ImportError(
        f"mamba_perception_kernels needs torch >= 2.4 (torch.library.custom_op); "
        f"found torch {torch.__version__}")


@functools.cache
def triton_available() -> bool:
    """Whether the ``triton`` package can be imported (checked without importing it)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # ValueError: sys.modules['triton'] is None (blocked)
        return False


def triton_version() -> str | None:
    """Installed Triton version, or None (imports triton; use only where it will be used)."""
    if not triton_available():
        return None
    import triton

    return triton.__version__
