"""Forward launchers for the three public ops (called by ``ops.py`` for CUDA tensors).

Inputs are validated by ``dispatch.py`` before they get here. Any strides are accepted: every
tensor is addressed through its own strides (no ``.contiguous()`` copies).
"""

from __future__ import annotations

import torch

from . import common
from .bidir import bidir_bwd, bidir_fwd
from .ss2d import ss2d_bwd, ss2d_fwd

__all__ = ["bidir_bwd", "bidir_fwd", "selective_scan_bwd", "selective_scan_fwd", "ss2d_bwd",
           "ss2d_fwd"]


def _selective_operands(u, delta, A, B, C, D, delta_bias, bc):
    """Tensors and strides the forward and backward launches share (one route: k stride 0)."""
    def seq(t):  # (batch, dim, L)
        return (t.stride(0), 0, t.stride(1), bc * t.stride(2), t.stride(2))

    def groups(t):  # (batch, G, N, L)
        return (t.stride(0), 0, t.stride(1), t.stride(2), bc * t.stride(3), t.stride(3))

    return dict(
        u=u, su=seq(u), delta=delta, sd=seq(delta),
        A=A, sA=(0, A.stride(0), A.stride(1)), B=B, sB=groups(B), C=C, sC=groups(C),
        D=D, sD=(0, D.stride(0) if D is not None else 0),
        bias=delta_bias, sbias=(0, delta_bias.stride(0) if delta_bias is not None else 0))


def selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, out_dtype=None):
    """Return (out (batch, dim, L) in u.dtype, last_state (batch, dim, N) fp32)."""
    batch, dim, length = u.shape
    groups, dstate = B.shape[1], A.shape[1]
    geo = common.sequence_geometry(length, dstate)
    out = torch.empty(batch, dim, length, device=u.device, dtype=out_dtype or u.dtype)
    last = torch.zeros(batch, dim, dstate, device=u.device, dtype=torch.float32)
    if length == 0:
        return out, last
    bc = geo.block_c
    common.run(
        common.MODE_SELECTIVE, 1, geo, dim, dstate, dim // groups,
        **_selective_operands(u, delta, A, B, C, D, delta_bias, bc),
        z=z, sz=(z.stride(0), z.stride(1), bc * z.stride(2), z.stride(2)) if z is not None
        else (0,) * 4,
        out=out, so=(out.stride(0), out.stride(1), bc * out.stride(2), out.stride(2)),
        softplus=delta_softplus, last_state=last)
    return out, last


def gate_grads(dout, y, z):
    """(dy, dz) for out = y * silu(z), in fp32."""
    zf = z.float()
    sig = torch.sigmoid(zf)
    dout = dout.float()
    return dout * zf * sig, dout * y * sig * (1 + zf * (1 - sig))


def ungate(dout, z, ungated_forward):
    """(dy, dz) for out = y * silu(z); y is recomputed (fp32) only when there is a gate."""
    if z is None:
        return dout, None
    return gate_grads(dout, ungated_forward(), z)


def selective_scan_bwd(dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """Return (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias) in the inputs' dtypes.

    The gradient of ``last_state`` is not handled here (ops.py uses the PyTorch backward
    when it is nonzero).
    """
    batch, dim, length = u.shape
    groups, dstate = B.shape[1], A.shape[1]
    dy, dz = ungate(dout, z, lambda: selective_scan_fwd(
        u, delta, A, B, C, D, None, delta_bias, delta_softplus, out_dtype=torch.float32)[0])
    geo = common.sequence_geometry(length, dstate)
    bc = geo.block_c
    du, dd, dA, dB, dC, dD, dbias = common.run_bwd(
        common.MODE_SELECTIVE, 1, geo, dim, dstate, dim // groups,
        **_selective_operands(u, delta, A, B, C, D, delta_bias, bc),
        dy=dy, sy=(dy.stride(0), dy.stride(1), bc * dy.stride(2), dy.stride(2)),
        softplus=delta_softplus)
    return (du.view(batch, dim, length).to(u.dtype), dd.view(batch, dim, length).to(delta.dtype),
            dA.to(A.dtype), dB.view(B.shape).to(B.dtype), dC.view(C.shape).to(C.dtype),
            None if D is None else dD.to(D.dtype), None if dz is None else dz.to(z.dtype),
            None if delta_bias is None else dbias.to(delta_bias.dtype))
