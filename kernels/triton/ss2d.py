"""Fused SS2D forward: VMamba's cross-scan + 4-route selective scan + cross-merge in one op.

The four routes are index arithmetic over the feature map in its native layout: routes 0/2 scan
tile rows (forwards / backwards), routes 1/3 scan tile columns, all four from the same loaded
tile of x, and their outputs are summed in registers and stored once (see ``scan_fwd.py``).

Layouts: x, y may have any strides. Channel-first (contiguous NCHW) is the fast layout: a tile
row is a contiguous run of W elements. A channels_last x / y is read and written in place but
with a stride of ``dim`` elements between neighbouring pixels (uncoalesced, slower); delta / B / C
are (batch, 4, ·, H, W) with W innermost in the fast case.
"""

from __future__ import annotations

import torch

from . import common


def _ss2d_operands(x, delta, A, B, C, D, delta_bias):
    """Tensors and strides the forward and backward launches share.

    A, D and delta_bias are route-major (row ``k * dim + c``), hence the ``dim *`` route strides.
    """
    dim = x.shape[1]

    def per_route(t):  # (batch, 4, N, H, W); one group per route
        return (t.stride(0), t.stride(1), 0, t.stride(2), t.stride(3), t.stride(4))

    return dict(
        u=x, su=(x.stride(0), 0, x.stride(1), x.stride(2), x.stride(3)),
        delta=delta, sd=tuple(delta.stride()),
        A=A, sA=(dim * A.stride(0), A.stride(0), A.stride(1)),
        B=B, sB=per_route(B), C=C, sC=per_route(C),
        D=D, sD=(dim * D.stride(0), D.stride(0)) if D is not None else (0, 0),
        bias=delta_bias,
        sbias=((dim * delta_bias.stride(0), delta_bias.stride(0)) if delta_bias is not None
               else (0, 0)))


def ss2d_fwd(x, delta, A, B, C, D, delta_bias, delta_softplus, out_dtype):
    """Return y (batch, dim, H, W) in ``out_dtype``: the sum of the four routes' outputs."""
    batch, dim, height, width = x.shape
    dstate = A.shape[1]
    out = torch.empty_like(x, dtype=out_dtype)  # keeps x's memory format (channels_last too)
    if height * width == 0:
        return out
    geo = common.image_geometry(height, width, dstate)
    common.run(
        common.MODE_SS2D, 4, geo, dim, dstate, dim,
        **_ss2d_operands(x, delta, A, B, C, D, delta_bias),
        z=None, sz=(0, 0, 0, 0),
        out=out, so=tuple(out.stride()), softplus=delta_softplus)
    return out


def ss2d_bwd(dy, x, delta, A, B, C, D, delta_bias, delta_softplus):
    """Return (dx, ddelta, dA, dB, dC, dD, ddelta_bias) in the inputs' dtypes."""
    batch, dim, height, width = x.shape
    dstate = A.shape[1]
    geo = common.image_geometry(height, width, dstate)
    du, dd, dA, dB, dC, dD, dbias = common.run_bwd(
        common.MODE_SS2D, 4, geo, dim, dstate, dim,
        **_ss2d_operands(x, delta, A, B, C, D, delta_bias),
        dy=dy, sy=tuple(dy.stride()), softplus=delta_softplus)
    return (du.view(x.shape).to(x.dtype), dd.view(delta.shape).to(delta.dtype), dA.to(A.dtype),
            dB.view(B.shape).to(B.dtype), dC.view(C.shape).to(C.dtype),
            None if D is None else dD.to(D.dtype),
            None if delta_bias is None else dbias.to(delta_bias.dtype))
