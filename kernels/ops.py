"""``torch.library`` registration: one custom op per public function, with fake impls and autograd.

``torch.compile`` and ``torch.export`` see ``mamba_perception::selective_scan``,
``mamba_perception::ss2d_scan`` and ``mamba_perception::bidir_scan`` as single opaque nodes (what
AOTInductor / a TensorRT plugin will hang on). Each op's implementation asks the dispatch for the
device's backend and calls the Triton launcher (CUDA) or the chunked PyTorch path (anything else).
Backward ops (``*_bwd``) are custom ops too, so a traced training graph also stays opaque; on
CUDA they run the Triton backward (``triton/scan_bwd.py``), elsewhere the analytic PyTorch
backward (``cpu.py``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import cpu
from .dispatch import backend_name, bidir_out
from .reference import as_parts, expand_lowrank, layer_norm_out

LIB = "mamba_perception"


def _triton():
    """Import the Triton launchers lazily (Triton is never imported on the CPU path)."""
    from .triton import launch

    return launch


def _empty(ref: Tensor) -> Tensor:
    """Return a placeholder for an absent gradient (custom ops cannot return None)."""
    return ref.new_empty(0)


def _opt(grads, inputs):
    return [(_empty(ref) if g is None else g) for g, ref in zip(grads, inputs, strict=True)]


# ---------------------------------------------------------------------------- selective_scan


@torch.library.custom_op(f"{LIB}::selective_scan", mutates_args=())
def selective_scan_op(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                      D: Optional[Tensor], z: Optional[Tensor], delta_bias: Optional[Tensor],
                      delta_softplus: bool) -> tuple[Tensor, Tensor]:
    """Return (out (batch, dim, L) in u.dtype, last_state (batch, dim, N) fp32)."""
    if backend_name(u.device) == "triton":
        return _triton().selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return cpu.selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


@selective_scan_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    batch, dim, _ = u.shape
    state_dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    return torch.empty_like(u), u.new_empty(batch, dim, A.shape[1], dtype=state_dtype)


@torch.library.custom_op(f"{LIB}::selective_scan_bwd", mutates_args=())
def selective_scan_bwd_op(dout: Tensor, dlast: Optional[Tensor], u: Tensor, delta: Tensor,
                          A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                          z: Optional[Tensor], delta_bias: Optional[Tensor],
                          delta_softplus: bool) -> list[Tensor]:
    """Return [du, ddelta, dA, dB, dC, dD, dz, ddelta_bias]; absent inputs give empty tensors.

    The Triton backward covers the gradient of ``out``; a gradient reaching ``last_state``
    (rare: the models never use it) takes the PyTorch backward on any device.
    """
    if backend_name(u.device) == "triton" and dlast is None:
        grads = _triton().selective_scan_bwd(dout, u, delta, A, B, C, D, z, delta_bias,
                                             delta_softplus)
    else:
        grads = cpu.selective_scan_bwd(dout, u, delta, A, B, C, D, z, delta_bias,
                                       delta_softplus, dlast=dlast)
    return _opt(grads, (u, delta, A, B, C, D if D is not None else u,
                        z if z is not None else u, delta_bias if delta_bias is not None else u))


@selective_scan_bwd_op.register_fake
def _(dout, dlast, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    outs = [u, delta, A, B, C, D, z, delta_bias]
    return [torch.empty_like(t) if t is not None else _empty(u) for t in outs]


# ---------------------------------------------------------------------------- ss2d_scan


@torch.library.custom_op(f"{LIB}::ss2d_scan", mutates_args=())
def ss2d_scan_op(x: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                 D: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool,
                 out_dtype: torch.dtype) -> Tensor:
    """Return y (batch, dim, H, W) in ``out_dtype``."""
    if backend_name(x.device) == "triton":
        return _triton().ss2d_fwd(x, delta, A, B, C, D, delta_bias, delta_softplus, out_dtype)
    return cpu.ss2d_fwd(x, delta, A, B, C, D, delta_bias, delta_softplus, out_dtype)


@ss2d_scan_op.register_fake
def _(x, delta, A, B, C, D, delta_bias, delta_softplus, out_dtype):
    # Same rule as both implementations: y keeps x's memory format (channels_last included);
    # inductor asserts the real strides against these.
    return torch.empty_like(x, dtype=out_dtype)


@torch.library.custom_op(f"{LIB}::ss2d_scan_bwd", mutates_args=())
def ss2d_scan_bwd_op(dy: Tensor, x: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                     D: Optional[Tensor], delta_bias: Optional[Tensor],
                     delta_softplus: bool) -> list[Tensor]:
    """Return [dx, ddelta, dA, dB, dC, dD, ddelta_bias]; absent inputs give empty tensors."""
    if backend_name(x.device) == "triton":
        grads = _triton().ss2d_bwd(dy, x, delta, A, B, C, D, delta_bias, delta_softplus)
    else:
        grads = cpu.ss2d_bwd(dy, x, delta, A, B, C, D, delta_bias, delta_softplus)
    return _opt(grads, (x, delta, A, B, C, x, x))


@ss2d_scan_bwd_op.register_fake
def _(dy, x, delta, A, B, C, D, delta_bias, delta_softplus):
    outs = [x, delta, A, B, C, D, delta_bias]
    return [torch.empty_like(t) if t is not None else _empty(x) for t in outs]


# ---------------------------------------------------------------------------- ss2d_scan_lowrank


@torch.library.custom_op(f"{LIB}::ss2d_scan_lowrank", mutates_args=())
def ss2d_scan_lowrank_op(x: Tensor, x_proj: Optional[Tensor], dt_weight: Tensor, A: Tensor,
                         D: Optional[Tensor], dt_bias: Optional[Tensor], delta_softplus: bool,
                         out_dtype: torch.dtype, a_is_log: bool = False, parts: int = 1,
                         norm_weight: Optional[Tensor] = None,
                         norm_bias: Optional[Tensor] = None, norm_eps: float = 1e-5,
                         x_proj_weight: Optional[Tensor] = None) -> Tensor:
    """Return y (batch, H, W, dim) contiguous in ``out_dtype`` (or LayerNorm(y)), or parts.

    parts=2: (2, ...) summing to y; ``norm_weight`` / ``norm_bias`` / ``norm_eps``: LayerNorm(y);
    ``x_proj_weight`` (4, R + 2N, dim), x_proj None: x_proj = x @ x_proj_weight.reshape(-1, dim).T,
    computed here.
    """
    norm = (None if norm_weight is None else
            (norm_weight.contiguous(), norm_bias.contiguous(), norm_eps))
    if backend_name(x.device) == "triton":
        from .triton.ss2d_lowrank import ss2d_lowrank_fwd

        return ss2d_lowrank_fwd(x, x_proj, dt_weight, A, D, dt_bias, delta_softplus, out_dtype,
                                a_is_log, parts, norm, x_proj_weight)
    if x_proj is None:
        x_proj = torch.nn.functional.linear(x, x_proj_weight.flatten(0, 1).to(x.dtype))
    if a_is_log:
        A = -torch.exp(A)
    xc, delta, B, C = expand_lowrank(x, x_proj, dt_weight, A.shape[1])
    if norm is not None:
        y = cpu.ss2d_fwd(xc, delta, A, B, C, D, dt_bias, delta_softplus, torch.float32)
        return layer_norm_out(y.permute(0, 2, 3, 1), norm, out_dtype).contiguous()
    y = cpu.ss2d_fwd(xc, delta, A, B, C, D, dt_bias, delta_softplus, out_dtype)
    return as_parts(y.permute(0, 2, 3, 1).contiguous(), parts)


@ss2d_scan_lowrank_op.register_fake
def _(x, x_proj, dt_weight, A, D, dt_bias, delta_softplus, out_dtype, a_is_log=False, parts=1,
      norm_weight=None, norm_bias=None, norm_eps=1e-5, x_proj_weight=None):
    # contiguous NHWC, as both paths return
    return x.new_empty((2,) * (parts == 2) + tuple(x.shape), dtype=out_dtype)


# ---------------------------------------------------------------------------- bidir_scan


@torch.library.custom_op(f"{LIB}::bidir_scan", mutates_args=())
def bidir_scan_op(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                  D: Optional[Tensor], z: Optional[Tensor], delta_bias: Optional[Tensor],
                  delta_softplus: bool) -> Tensor:
    """Return y (batch, dim, L) in u.dtype."""
    if backend_name(u.device) == "triton":
        return _triton().bidir_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    y = cpu.bidir_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    out = bidir_out(u, u.dtype)
    return y if y.stride() == out.stride() else out.copy_(y)


@bidir_scan_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    return bidir_out(u, u.dtype)


@torch.library.custom_op(f"{LIB}::bidir_scan_bwd", mutates_args=())
def bidir_scan_bwd_op(dout: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                      D: Optional[Tensor], z: Optional[Tensor], delta_bias: Optional[Tensor],
                      delta_softplus: bool) -> list[Tensor]:
    """Return [du, ddelta, dA, dB, dC, dD, dz, ddelta_bias]; absent inputs give empty tensors."""
    if backend_name(u.device) == "triton":
        grads = _triton().bidir_bwd(dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    else:
        grads = cpu.bidir_bwd(dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return _opt(grads, (u, delta, A, B, C, u, u, u))


@bidir_scan_bwd_op.register_fake
def _(dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    outs = [u, delta, A, B, C, D, z, delta_bias]
    return [torch.empty_like(t) if t is not None else _empty(u) for t in outs]


from . import autograd as _autograd  # noqa: E402  (registers the backward formulas)

_autograd.register(selective_scan_op, ss2d_scan_op, bidir_scan_op, ss2d_scan_lowrank_op)
