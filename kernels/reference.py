"""Sequential reference implementations (the spec and the test oracle; never optimised).

The math is mamba_ssm's ``selective_scan_ref`` (``mamba_ssm/ops/selective_scan_interface.py``):

* ``delta = softplus(delta + delta_bias)`` with the value passed through unchanged above 20
  (``F.softplus``'s default threshold, which is what the CUDA kernel does too);
* ``deltaA = exp(delta * A)``, Euler ``deltaB_u = delta * B * u``;
* ``h_l = deltaA_l * h_{l-1} + deltaB_u_l`` with ``h_{-1} = 0``, fp32 state;
* ``y_l = C_l . h_l + D * u_l`` and ``out = y * silu(z)``.

Everything is computed in fp32 (float64 when an input is float64, for gradient checks) and cast to
the output dtype once at the end. ``ss2d_scan_ref`` and ``bidir_scan_ref`` are written as the
explicit cross-scan / flip + ``selective_scan_ref`` + cross-merge / flip that VMamba and Vim run;
the four (or two) route outputs are summed in fp32 before the single cast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """Return float64 if any given tensor is float64 (gradcheck), else float32."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def _scan_fp(u, delta, A, B, C, D, z, delta_bias, delta_softplus, cdt):
    """Sequential scan in ``cdt``; returns (out before the final cast, last_state)."""
    batch, dim, length = u.shape
    groups, dstate = B.shape[1], A.shape[1]
    u = u.to(cdt)
    delta = delta.to(cdt)
    if delta_bias is not None:
        delta = delta + delta_bias.to(cdt)[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)  # threshold=20: identity above 20, as in the CUDA kernel
    # (batch, G, N, L) -> (batch, dim, N, L): group g serves channels [g*dim/G, (g+1)*dim/G).
    Bx = B.to(cdt).repeat_interleave(dim // groups, dim=1)
    Cx = C.to(cdt).repeat_interleave(dim // groups, dim=1)
    deltaA = torch.exp(delta[:, :, None, :] * A.to(cdt)[None, :, :, None])  # (b, d, N, L)
    deltaB_u = (delta * u)[:, :, None, :] * Bx
    h = u.new_zeros(batch, dim, dstate)
    ys = []
    for i in range(length):
        h = deltaA[..., i] * h + deltaB_u[..., i]
        ys.append((h * Cx[..., i]).sum(-1))
    y = torch.stack(ys, dim=-1) if length else u.new_zeros(batch, dim, 0)
    if D is not None:
        y = y + u * D.to(cdt)[None, :, None]
    if z is not None:
        y = y * F.silu(z.to(cdt))
    return y, h


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                       delta_softplus=False, return_last_state=False):
    """Mamba-1 selective scan, one step at a time.

    Shapes::

        u, delta:   (batch, dim, L)      fp32 / fp16 / bf16
        A:          (dim, N)             fp32
        B, C:       (batch, G, N, L)     dim % G == 0
        D:          (dim,)               fp32, optional
        z:          (batch, dim, L)      optional gate, out = y * silu(z)
        delta_bias: (dim,)               fp32, optional
        returns     out (batch, dim, L) in u.dtype [, last_state (batch, dim, N) fp32]
    """
    cdt = _compute_dtype(u, delta, A, B, C, D, z, delta_bias)
    out, h = _scan_fp(u, delta, A, B, C, D, z, delta_bias, delta_softplus, cdt)
    out = out.to(u.dtype)
    return (out, h) if return_last_state else out


def cross_scan(x: torch.Tensor) -> torch.Tensor:
    """VMamba's CrossScan: (batch, C, H, W) -> (batch, 4, C, H*W) in the four route orders."""
    batch, dim, height, width = x.shape
    row = x.reshape(batch, dim, height * width)                  # k=0: l = h*W + w
    col = x.transpose(2, 3).reshape(batch, dim, height * width)  # k=1: l = w*H + h
    return torch.stack([row, col, row.flip(-1), col.flip(-1)], dim=1)


def cross_merge(ys: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """VMamba's CrossMerge: (batch, 4, C, L) route outputs -> (batch, C, H, W), summed."""
    batch, _, dim, _ = ys.shape
    row = ys[:, 0] + ys[:, 2].flip(-1)
    col = ys[:, 1] + ys[:, 3].flip(-1)
    col = col.reshape(batch, dim, width, height).transpose(2, 3)
    return (row.reshape(batch, dim, height, width) + col)


def route_sequences(t: torch.Tensor) -> torch.Tensor:
    """Per-route tensors in native layout (batch, 4, X, H, W) -> route order (batch, 4, X, L).

    Route k's value at pixel (h, w) lands at the position that route visits (h, w).
    """
    return torch.stack([cross_scan(t[:, k])[:, k] for k in range(4)], dim=1)


def ss2d_scan_ref(x, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True,
                  out_dtype=None):
    """VMamba SS2D: cross-scan + selective scan over 4 routes + cross-merge.

    Shapes::

        x:              (batch, dim, H, W)
        delta:          (batch, 4, dim, H, W)  raw delta of route k at pixel (h, w)
        B, C:           (batch, 4, N, H, W)    route k's B / C at pixel (h, w)
        A:              (4*dim, N) fp32        route-major: row k*dim + c
        D, delta_bias:  (4*dim,) fp32          route-major
        returns         y (batch, dim, H, W) in out_dtype (default x.dtype)

    Routes: k=0 row-major, k=1 column-major, k=2 / k=3 the reverses of k=0 / k=1.
    """
    batch, dim, height, width = x.shape
    length = height * width
    cdt = _compute_dtype(x, delta, A, B, C, D, delta_bias)
    xs = cross_scan(x).reshape(batch, 4 * dim, length)
    ds = route_sequences(delta).reshape(batch, 4 * dim, length)
    Bs = route_sequences(B)
    Cs = route_sequences(C)
    ys, _ = _scan_fp(xs, ds, A, Bs, Cs, D, None, delta_bias, delta_softplus, cdt)
    y = cross_merge(ys.reshape(batch, 4, dim, length), height, width)
    return y.to(out_dtype or x.dtype)


def expand_lowrank(x, x_proj, dt_weight, d_state):
    """Operands of ``ss2d_scan`` from the low-rank form of ``ss2d_scan_lowrank``.

    Args:
        x: (batch, H, W, dim) channels-last activations.
        x_proj: (batch, H, W, 4 * (R + 2N)); route k's [dt (R), B (N), C (N)] start at k*(R+2N).
        dt_weight: (4, dim, R), VMamba's ``dt_projs_weight``.
        d_state: N.

    Returns:
        (x (batch, dim, H, W) view, delta (batch, 4, dim, H, W), B, C (batch, 4, N, H, W)
        views into x_proj), with delta = the per-route projection of the dt factors, in the
        promoted dtype of x_proj and dt_weight.
    """
    batch, height, width, _ = x.shape
    rank = dt_weight.shape[2]
    parts = x_proj.reshape(batch, height, width, 4, rank + 2 * d_state)
    dts = parts[..., :rank]
    cdt = torch.promote_types(x_proj.dtype, dt_weight.dtype)
    delta = torch.einsum('bhwkr,kcr->bkchw', dts.to(cdt), dt_weight.to(cdt))
    B = parts[..., rank:rank + d_state].permute(0, 3, 4, 1, 2)
    C = parts[..., rank + d_state:].permute(0, 3, 4, 1, 2)
    return x.permute(0, 3, 1, 2), delta, B, C


def as_parts(y, parts):
    """``ss2d_scan_lowrank``'s output form: y itself (parts=1), or (y, 0) stacked (parts=2)."""
    return y if parts == 1 else torch.stack((y, torch.zeros_like(y)))


def layer_norm_out(y, norm, out_dtype):
    """LayerNorm over y's last dimension in fp32, ``norm`` = (weight, bias, eps), in out_dtype.

    What ``ss2d_scan_lowrank(..., norm_weight=...)`` returns: nn.LayerNorm of the route sum
    (fp32 under autocast), cast once.
    """
    weight, bias, eps = norm
    return F.layer_norm(y.float(), (y.shape[-1],), weight.float(), bias.float(),
                        eps).to(out_dtype)


def ss2d_scan_lowrank_ref(x, x_proj, dt_weight, A, D=None, dt_bias=None, delta_softplus=True,
                          out_dtype=None):
    """``ss2d_scan_lowrank`` by its definition: expand Δ, run ``ss2d_scan_ref``, go NHWC."""
    xc, delta, B, C = expand_lowrank(x, x_proj, dt_weight, A.shape[1])
    y = ss2d_scan_ref(xc, delta, A, B, C, D, dt_bias, delta_softplus, out_dtype or x.dtype)
    return y.permute(0, 2, 3, 1).contiguous()


def bidir_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True):
    """Vim bidirectional scan: forward scan + scan of the flipped sequence, flipped back.

    Shapes::

        u, delta:       (batch, 2, dim, L)  both directions in natural sequence order
        A:              (2, dim, N) fp32
        B, C:           (batch, 2, N, L)
        D, delta_bias:  (2, dim) fp32
        z:              (batch, dim, L)     shared gate
        returns         (batch, dim, L) in u.dtype = (y_0 + y_1) * silu(z)

    Direction 0 scans l = 0..L-1, direction 1 scans l = L-1..0.
    """
    cdt = _compute_dtype(u, delta, A, B, C, D, z, delta_bias)
    ys = []
    for k in range(2):
        flip = (lambda t: t.flip(-1)) if k == 1 else (lambda t: t)  # noqa: E731
        y, _ = _scan_fp(flip(u[:, k]), flip(delta[:, k]), A[k], flip(B[:, k:k + 1]),
                        flip(C[:, k:k + 1]), None if D is None else D[k], None,
                        None if delta_bias is None else delta_bias[k], delta_softplus, cdt)
        ys.append(flip(y))
    y = ys[0] + ys[1]
    if z is not None:
        y = y * F.silu(z.to(cdt))
    return y.to(u.dtype)
