"""Fused bidirectional scan (Vim): both directions, their own parameters, one launch per pass.

Direction 1 is a reversed route over the same natural-order tensors: ``tl.associative_scan``
runs with ``reverse=True`` and the segments are chained backwards, so no ``flip`` copy is made.
Both directions' outputs are summed in registers and gated by the shared silu(z) before one store.
"""

from __future__ import annotations

import torch

from . import common


def _bidir_operands(u, delta, A, B, C, D, delta_bias, bc):
    """Tensors and strides the forward and backward launches share."""
    def seq(t):  # (batch, 2, dim, L)
        return (t.stride(0), t.stride(1), t.stride(2), bc * t.stride(3), t.stride(3))

    def per_direction(t):  # (batch, 2, N, L): one group per direction
        return (t.stride(0), t.stride(1), 0, t.stride(2), bc * t.stride(3), t.stride(3))

    return dict(
        u=u, su=seq(u), delta=delta, sd=seq(delta),
        A=A, sA=(A.stride(0), A.stride(1), A.stride(2)),
        B=B, sB=per_direction(B), C=C, sC=per_direction(C),
        D=D, sD=tuple(D.stride()) if D is not None else (0, 0),
        bias=delta_bias, sbias=tuple(delta_bias.stride()) if delta_bias is not None else (0, 0))


def bidir_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, out_dtype=None):
    """Return (y_0 + y_1) * silu(z), (batch, dim, L) in u.dtype."""
    batch, _, dim, length = u.shape
    dstate = A.shape[2]
    out = torch.empty(batch, dim, length, device=u.device, dtype=out_dtype or u.dtype)
    if length == 0:
        return out
    geo = common.sequence_geometry(length, dstate)
    bc = geo.block_c
    common.run(
        common.MODE_BIDIR, 2, geo, dim, dstate, dim,
        **_bidir_operands(u, delta, A, B, C, D, delta_bias, bc),
        z=z, sz=((z.stride(0), z.stride(1), bc * z.stride(2), z.stride(2)) if z is not None
                 else (0, 0, 0, 0)),
        out=out, so=(out.stride(0), out.stride(1), bc * out.stride(2), out.stride(2)),
        softplus=delta_softplus)
    return out


def bidir_bwd(dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """Return (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias) in the inputs' dtypes."""
    from .launch import ungate

    batch, _, dim, length = u.shape
    dstate = A.shape[2]
    dy, dz = ungate(dout, z, lambda: bidir_fwd(
        u, delta, A, B, C, D, None, delta_bias, delta_softplus, out_dtype=torch.float32))
    geo = common.sequence_geometry(length, dstate)
    bc = geo.block_c
    du, dd, dA, dB, dC, dD, dbias = common.run_bwd(
        common.MODE_BIDIR, 2, geo, dim, dstate, dim,
        **_bidir_operands(u, delta, A, B, C, D, delta_bias, bc),
        dy=dy, sy=(dy.stride(0), dy.stride(1), bc * dy.stride(2), dy.stride(2)),
        softplus=delta_softplus)
    return (du.to(u.dtype), dd.to(delta.dtype), dA.view(A.shape).to(A.dtype),
            dB.view(B.shape).to(B.dtype), dC.view(C.shape).to(C.dtype),
            None if D is None else dD.view(D.shape).to(D.dtype),
            None if dz is None else dz.to(z.dtype),
            None if delta_bias is None else dbias.view(delta_bias.shape).to(delta_bias.dtype))
