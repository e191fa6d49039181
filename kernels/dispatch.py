"""Input validation (naming the bad tensor) and the one backend choice per device.

``backend_name(device)`` is what every op uses: ``'triton'`` for CUDA devices when Triton can be
imported, ``'torch-chunked'`` otherwise. The environment variable
``MAMBA_PERCEPTION_SCAN_BACKEND=torch-chunked`` forces the PyTorch path on CUDA too (debugging,
A/B timing). The choice is made once per device type and logged at INFO level.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

from ._compat import triton_available
from .errors import ScanInputError

log = logging.getLogger(__name__)

MAX_DSTATE = 256  # same bound as mamba_ssm's CUDA kernel; the Triton kernels loop over states
ACT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Output dtypes of the fused inference ops that take ``out_dtype`` (None: fp32).
OUT_DTYPES = (None, torch.float32, torch.float16, torch.bfloat16)
PARAM_DTYPES = (torch.float32, torch.float64)
BACKENDS = ("triton", "torch-chunked")


@functools.cache
def _backend_for(device_type: str) -> str:
    forced = os.environ.get("MAMBA_PERCEPTION_SCAN_BACKEND")
    if forced is not None and forced not in BACKENDS:
        raise ScanInputError(
            f"MAMBA_PERCEPTION_SCAN_BACKEND={forced!r}; expected one of {BACKENDS}")
    if device_type == "cuda" and triton_available() and forced != "torch-chunked":
        name = "triton"
    else:
        name = "torch-chunked"
    log.info("selective-scan backend for %s devices: %s", device_type, name)
    return name


def backend_name(device: torch.device | str) -> str:
    """Return the backend the dispatch picks for ``device``: 'triton' or 'torch-chunked'."""
    return _backend_for(torch.device(device).type)


def dense_vectors(*vectors):
    """Return contiguous copies (or None): the kernels read norms and biases as dense vectors."""
    return tuple(None if v is None else v.contiguous() for v in vectors)


def without_autocast(fn):
    """Run a PyTorch path (first argument a tensor) with autocast off on its device.

    The fused ops' PyTorch paths cast explicitly where their kernels round; inside a caller's
    autocast region (the models run under one) their fp32 convs and GEMMs would otherwise run
    in 16 bits.
    """
    @functools.wraps(fn)
    def wrapper(x, *args, **kwargs):
        with torch.autocast(x.device.type, enabled=False):
            return fn(x, *args, **kwargs)

    return wrapper


def _desc(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_tensor(name: str, t, shape: tuple, dtypes: tuple, device: torch.device | None):
    """Raise ScanInputError unless ``t`` has ``shape`` (None: any size), dtype and device."""
    if not isinstance(t, torch.Tensor):
        raise ScanInputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != len(shape) or any(
            s is not None and s != d for s, d in zip(shape, t.shape, strict=True)):
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise ScanInputError(f"{name} must have shape {want}; got {_desc(t)}")
    if t.dtype not in dtypes:
        raise ScanInputError(
            f"{name} must have dtype in {[str(d) for d in dtypes]}; got {_desc(t)}")
    if device is not None and t.device != device:
        raise ScanInputError(f"{name} must be on {device} like the first input; got {_desc(t)}")
    if t.dtype == torch.float64 and t.device.type == "cuda":
        raise ScanInputError(
            f"{name} is float64 on CUDA; float64 is supported on the CPU path only "
            f"(gradient checks); got {_desc(t)}")


def _check_dstate(name: str, n: int):
    if not 1 <= n <= MAX_DSTATE:
        raise ScanInputError(
            f"{name}: d_state N={n} is outside the supported range 1..{MAX_DSTATE}")


def check_selective_scan(u, delta, A, B, C, D, z, delta_bias):
    """Validate ``selective_scan`` arguments; returns (batch, dim, L, G, N)."""
    check_tensor("u", u, (None, None, None), ACT_DTYPES, None)
    batch, dim, length = u.shape
    dev = u.device
    check_tensor("delta", delta, (batch, dim, length), ACT_DTYPES, dev)
    check_tensor("A", A, (dim, None), PARAM_DTYPES, dev)
    dstate = A.shape[1]
    _check_dstate("A", dstate)
    check_tensor("B", B, (batch, None, dstate, length), ACT_DTYPES, dev)
    groups = B.shape[1]
    if groups < 1 or dim % groups:
        raise ScanInputError(
            f"B: groups G={groups} must divide dim={dim} (B is (batch, G, N, L)); got {_desc(B)}")
    check_tensor("C", C, (batch, groups, dstate, length), ACT_DTYPES, dev)
    if D is not None:
        check_tensor("D", D, (dim,), PARAM_DTYPES, dev)
    if z is not None:
        check_tensor("z", z, (batch, dim, length), ACT_DTYPES, dev)
    if delta_bias is not None:
        check_tensor("delta_bias", delta_bias, (dim,), PARAM_DTYPES, dev)
    return batch, dim, length, groups, dstate


def check_ss2d(x, delta, A, B, C, D, delta_bias):
    """Validate ``ss2d_scan`` arguments; returns (batch, dim, H, W, N)."""
    check_tensor("x", x, (None, None, None, None), ACT_DTYPES, None)
    batch, dim, height, width = x.shape
    dev = x.device
    check_tensor("delta", delta, (batch, 4, dim, height, width), ACT_DTYPES, dev)
    check_tensor("A", A, (4 * dim, None), PARAM_DTYPES, dev)
    dstate = A.shape[1]
    _check_dstate("A", dstate)
    check_tensor("B", B, (batch, 4, dstate, height, width), ACT_DTYPES, dev)
    check_tensor("C", C, (batch, 4, dstate, height, width), ACT_DTYPES, dev)
    if D is not None:
        check_tensor("D", D, (4 * dim,), PARAM_DTYPES, dev)
    if delta_bias is not None:
        check_tensor("delta_bias", delta_bias, (4 * dim,), PARAM_DTYPES, dev)
    return batch, dim, height, width, dstate


def check_ss2d_lowrank(x, x_proj, dt_weight, A, D, dt_bias, x_proj_weight=None):
    """Validate ``ss2d_scan_lowrank`` arguments; returns (batch, H, W, dim, R, N).

    Exactly one of ``x_proj`` and ``x_proj_weight`` (the projection's weight, from which the
    op computes x_proj itself) is given.
    """
    check_tensor("x", x, (None, None, None, None), ACT_DTYPES, None)
    batch, height, width, dim = x.shape
    dev = x.device
    check_tensor("A", A, (4 * dim, None), PARAM_DTYPES, dev)
    dstate = A.shape[1]
    _check_dstate("A", dstate)
    check_tensor("dt_weight", dt_weight, (4, dim, None), ACT_DTYPES, dev)
    rank = dt_weight.shape[2]
    if rank < 1:
        raise ScanInputError(f"dt_weight: rank R must be >= 1; got {_desc(dt_weight)}")
    width_p = 4 * (rank + 2 * dstate)
    if (x_proj is None) == (x_proj_weight is None):
        raise ScanInputError("give exactly one of x_proj and x_proj_weight")
    if x_proj is not None:
        check_tensor("x_proj", x_proj, (batch, height, width, width_p), ACT_DTYPES, dev)
    else:
        check_tensor("x_proj_weight", x_proj_weight, (4, rank + 2 * dstate, dim), ACT_DTYPES,
                     dev)
    if D is not None:
        check_tensor("D", D, (4 * dim,), PARAM_DTYPES, dev)
    if dt_bias is not None:
        check_tensor("dt_bias", dt_bias, (4 * dim,), PARAM_DTYPES, dev)
    return batch, height, width, dim, rank, dstate


def check_bidir(u, delta, A, B, C, D, z, delta_bias):
    """Validate ``bidir_scan`` arguments; returns (batch, dim, L, N)."""
    check_tensor("u", u, (None, 2, None, None), ACT_DTYPES, None)
    batch, _, dim, length = u.shape
    dev = u.device
    check_tensor("delta", delta, (batch, 2, dim, length), ACT_DTYPES, dev)
    check_tensor("A", A, (2, dim, None), PARAM_DTYPES, dev)
    dstate = A.shape[2]
    _check_dstate("A", dstate)
    check_tensor("B", B, (batch, 2, dstate, length), ACT_DTYPES, dev)
    check_tensor("C", C, (batch, 2, dstate, length), ACT_DTYPES, dev)
    if D is not None:
        check_tensor("D", D, (2, dim), PARAM_DTYPES, dev)
    if z is not None:
        check_tensor("z", z, (batch, dim, length), ACT_DTYPES, dev)
    if delta_bias is not None:
        check_tensor("delta_bias", delta_bias, (2, dim), PARAM_DTYPES, dev)
    return batch, dim, length, dstate


def bidir_out(u, dtype):
    """Allocate ``bidir_scan``'s output (batch, dim, L) in the layout of ``u``.

    A channel-first view of a (batch, L, dim) buffer when ``u`` is one (dim stride 1, as Vim's
    block passes it), else contiguous.

    Every backend and the fake (compile-time) implementation allocate through this, so the
    output strides that torch.compile records are the ones the kernels produce.
    """
    batch, _, dim, length = u.shape
    if u.stride(2) == 1:
        return u.new_empty(batch, length, dim, dtype=dtype).transpose(1, 2)
    return u.new_empty(batch, dim, length, dtype=dtype)


def check_out_dtype(out_dtype, allowed=ACT_DTYPES):
    """Validate an op's ``out_dtype`` (the scans': ACT_DTYPES; the fused ops': OUT_DTYPES)."""
    if out_dtype not in allowed:
        raise ScanInputError(
            f"out_dtype must be one of {[str(d) for d in allowed]}; got {out_dtype!r:.40}")
