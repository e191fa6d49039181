"""Chunked PyTorch path (any device; used whenever tensors are not on CUDA).

No Python loop over L. The linear recurrence ``h_l = a_l * h_{l-1} + b_l`` is evaluated in two
levels over pairs ``(a, b)`` with the operator ``(a0, b0) o (a1, b1) = (a0 * a1, a1 * b0 + b1)``
(mamba's ``SSMScanOp``):

1. the sequence is cut into chunks of T ~ sqrt(L) steps (16..256); all chunks of all sequences
   are scanned together, T in-place vectorised steps, keeping the running product of a;
2. the chunk aggregates are combined by a Hillis-Steele scan (log2(n_chunks) vectorised steps)
   to get the state entering each chunk, which is then applied to the chunk's local result.

So the number of Python-level steps is T + log2(n_chunks) <= ~270 for any L, each one a
vectorised op over B*D*N*L/T elements.

Only products of ``a = exp(delta * A)`` factors appear, never ``exp(cumsum)`` ratios, so nothing
overflows that the sequential recurrence would not overflow too; products that underflow to 0
are the true (tiny) values.

The backward pass is written out analytically (the same formulas the Triton backward uses):
``g_l = C_l * dy_l + a_{l+1} * g_{l+1}`` is a reverse scan of the same form, and every gradient is
an elementwise product of ``g``, the recomputed states ``h`` and the inputs, reduced over the
broadcast axes. Memory is O(batch * dim * N * L), which is fine for CPU fine-tuning and gradient
checks; the fused GPU kernels do not store such tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import _compute_dtype, cross_scan, route_sequences


def _hillis_steele(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive scan of (a, b) pairs along the last axis; returns (prod a, state)."""
    length = a.shape[-1]
    off = 1
    while off < length:
        b = torch.cat([b[..., :off], a[..., off:] * b[..., :-off] + b[..., off:]], dim=-1)
        a = torch.cat([a[..., :off], a[..., off:] * a[..., :-off]], dim=-1)
        off *= 2
    return a, b


def chunk_length(length: int) -> int:
    """Chunk length ~ sqrt(L) (a power of two in [16, 256]): balances the two levels."""
    t = 16
    while t * t < length and t < 256:
        t *= 2
    return t


def linear_scan(a: torch.Tensor, b: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Return h with ``h_l = a_l * h_{l-1} + b_l`` (h_{-1} = 0) along the last axis.

    Within chunks: ``chunk`` in-place steps, each vectorised over every chunk of every sequence
    (the chunk axis is made contiguous first); across chunks: a Hillis-Steele scan of the chunk
    aggregates. Python iterations: chunk + log2(n_chunks), independent of L beyond that.
    Not differentiable by autograd (in-place); the ops' backward is analytic.
    """
    length = a.shape[-1]
    if length == 0:
        return b.clone()
    chunk = chunk or chunk_length(length)
    n_chunks = -(-length // chunk)
    pad = n_chunks * chunk - length
    if pad:
        # Identity elements (a=1, b=0) keep the carried state unchanged.
        a = F.pad(a, (0, pad), value=1.0)
        b = F.pad(b, (0, pad), value=0.0)
    lead = a.shape[:-1]
    # (..., T, n_chunks): step t of every chunk is one contiguous row. Always a fresh copy,
    # so the in-place updates below never touch the caller's tensors.
    a = a.reshape(*lead, n_chunks, chunk).transpose(-1, -2).clone(
        memory_format=torch.contiguous_format)
    b = b.reshape(*lead, n_chunks, chunk).transpose(-1, -2).clone(
        memory_format=torch.contiguous_format)
    for t in range(1, chunk):
        b[..., t, :].addcmul_(a[..., t, :], b[..., t - 1, :])
        a[..., t, :].mul_(a[..., t - 1, :])   # cumulative product within the chunk
    if n_chunks > 1:
        _, h_after = _hillis_steele(a[..., -1, :], b[..., -1, :])  # state after each chunk
        h_in = torch.cat([torch.zeros_like(h_after[..., :1]), h_after[..., :-1]], dim=-1)
        b.addcmul_(a, h_in.unsqueeze(-2))
    return b.transpose(-1, -2).reshape(*lead, n_chunks * chunk)[..., :length]


def reverse_linear_scan(a: torch.Tensor, b: torch.Tensor, chunk: int | None = None):
    """Return g with ``g_l = a_l * g_{l+1} + b_l`` (g_L = 0) along the last axis."""
    return linear_scan(a.flip(-1), b.flip(-1), chunk).flip(-1)


def _softplus_delta(delta, delta_bias, delta_softplus, cdt):
    """Return (pre-activation x, activated delta) in ``cdt``, both (batch, dim, L)."""
    x = delta.to(cdt)
    if delta_bias is not None:
        x = x + delta_bias.to(cdt)[None, :, None]
    return x, (F.softplus(x) if delta_softplus else x)


def _grouped(u, delta, A, B, C, cdt):
    """Return views in (batch, G, dim/G, N, L) broadcast form."""
    batch, dim, length = u.shape
    groups, dstate = B.shape[1], A.shape[1]
    dpg = dim // groups
    u5 = u.to(cdt).reshape(batch, groups, dpg, 1, length)
    d5 = delta.reshape(batch, groups, dpg, 1, length)
    A5 = A.to(cdt).reshape(1, groups, dpg, dstate, 1)
    B5 = B.to(cdt).reshape(batch, groups, 1, dstate, length)
    C5 = C.to(cdt).reshape(batch, groups, 1, dstate, length)
    return u5, d5, A5, B5, C5


def scan_core_fwd(u, delta, A, B, C, D, delta_bias, delta_softplus, cdt):
    """Ungated scan ``y = C.h + D*u`` in ``cdt``; return (y (b, dim, L), last (b, dim, N))."""
    batch, dim, length = u.shape
    _, dl = _softplus_delta(delta, delta_bias, delta_softplus, cdt)
    u5, d5, A5, B5, C5 = _grouped(u, dl, A, B, C, cdt)
    h = linear_scan(torch.exp(d5 * A5), (d5 * u5) * B5)
    y = (h * C5).sum(3).reshape(batch, dim, length)
    if D is not None:
        y = y + u.to(cdt) * D.to(cdt)[None, :, None]
    if length:
        last = h[..., -1].reshape(batch, dim, -1)
    else:
        last = h.new_zeros(batch, dim, A.shape[1])
    return y, last


def scan_core_bwd(dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus, cdt, dlast=None):
    """Gradients of ``out = (C.h + D*u) * silu(z)`` (z optional), all in ``cdt``.

    ``dlast`` (batch, dim, N) is the gradient reaching the last state, if it is used.

    Returns (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias); dD / dz / ddelta_bias are None when
    the corresponding input is None.
    """
    batch, dim, length = u.shape
    groups, dstate = B.shape[1], A.shape[1]
    x, dl = _softplus_delta(delta, delta_bias, delta_softplus, cdt)
    u5, d5, A5, B5, C5 = _grouped(u, dl, A, B, C, cdt)
    a = torch.exp(d5 * A5)
    du_b = d5 * u5
    h = linear_scan(a, du_b * B5)
    dout = dout.to(cdt)
    dz = None
    if z is not None:
        zc = z.to(cdt)
        y = (h * C5).sum(3).reshape(batch, dim, length)
        if D is not None:
            y = y + u.to(cdt) * D.to(cdt)[None, :, None]
        sig = torch.sigmoid(zc)
        dz = dout * y * sig * (1 + zc * (1 - sig))
        dy = dout * zc * sig
    else:
        dy = dout
    dy5 = dy.reshape(batch, groups, dim // groups, 1, length)
    # g_l = dL/dh_l = C_l dy_l + a_{l+1} g_{l+1}
    a_next = torch.cat([a[..., 1:], torch.zeros_like(a[..., :1])], dim=-1)
    c = C5 * dy5
    if dlast is not None and length:
        dl5 = dlast.to(cdt).reshape(batch, groups, dim // groups, dstate, 1)
        c = c + F.pad(dl5, (length - 1, 0))
    g = reverse_linear_scan(a_next, c)
    h_prev = torch.cat([torch.zeros_like(h[..., :1]), h[..., :-1]], dim=-1)
    dlog = g * h_prev * a                      # dL/d(delta*A)
    gB = (g * B5).sum(3, keepdim=True)         # dL/d(delta*u)
    ddelta = ((dlog * A5).sum(3, keepdim=True) + gB * u5).reshape(batch, dim, length)
    du = (gB * d5).reshape(batch, dim, length)
    dA = (dlog * d5).sum((0, 4)).reshape(dim, dstate)
    dB = (g * du_b).sum(2)
    dC = (h * dy5).sum(2)
    dD = None
    if D is not None:
        du = du + dy * D.to(cdt)[None, :, None]
        dD = (dy * u.to(cdt)).sum((0, 2))
    if delta_softplus:
        # softplus' = sigmoid, except where F.softplus passes the value through (x > 20).
        ddelta = ddelta * torch.where(x > 20, torch.ones_like(x), torch.sigmoid(x))
    dbias = None if delta_bias is None else ddelta.sum((0, 2))
    return du, ddelta, dA, dB, dC, dD, dz, dbias


# --------------------------------------------------------------------------------------------
# Public-signature CPU implementations (validated inputs; see dispatch.py)
# --------------------------------------------------------------------------------------------


def selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """Return (out in u.dtype, last_state fp32) for (batch, dim, L) inputs."""
    cdt = _compute_dtype(u, delta, A, B, C, D, z, delta_bias)
    y, last = scan_core_fwd(u, delta, A, B, C, D, delta_bias, delta_softplus, cdt)
    if z is not None:
        y = y * F.silu(z.to(cdt))
    return y.to(u.dtype), last.to(cdt)


def selective_scan_bwd(dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus, dlast=None):
    """Return (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias), each in its input's dtype."""
    cdt = _compute_dtype(u, delta, A, B, C, D, z, delta_bias)
    grads = scan_core_bwd(dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus, cdt,
                          dlast=dlast)
    inputs = (u, delta, A, B, C, D, z, delta_bias)
    return tuple(None if g is None else g.to(t.dtype) for g, t in zip(grads, inputs, strict=True))


def unroute(ys: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of ``route_sequences``: (batch, 4, X, L) in route order -> (batch, 4, X, H, W)."""
    batch, _, feat, _ = ys.shape
    row0 = ys[:, 0].reshape(batch, feat, height, width)
    row2 = ys[:, 2].flip(-1).reshape(batch, feat, height, width)
    col1 = ys[:, 1].reshape(batch, feat, width, height).transpose(2, 3)
    col3 = ys[:, 3].flip(-1).reshape(batch, feat, width, height).transpose(2, 3)
    return torch.stack([row0, col1, row2, col3], dim=1)


def ss2d_fwd(x, delta, A, B, C, D, delta_bias, delta_softplus, out_dtype):
    """Cross-scan (materialised on CPU) + chunked scan + cross-merge; returns (b, dim, H, W)."""
    batch, dim, height, width = x.shape
    length = height * width
    cdt = _compute_dtype(x, delta, A, B, C, D, delta_bias)
    xs = cross_scan(x).reshape(batch, 4 * dim, length)
    ds = route_sequences(delta).reshape(batch, 4 * dim, length)
    ys, _ = scan_core_fwd(xs, ds, A, route_sequences(B), route_sequences(C), D, delta_bias,
                          delta_softplus, cdt)
    y = unroute(ys.reshape(batch, 4, dim, length), height, width).sum(1)
    out = torch.empty_like(x, dtype=out_dtype)  # x's memory format, as the Triton path does
    return out.copy_(y)


def ss2d_bwd(dy, x, delta, A, B, C, D, delta_bias, delta_softplus):
    """Return (dx, ddelta, dA, dB, dC, dD, ddelta_bias) for ``ss2d_fwd``."""
    batch, dim, height, width = x.shape
    length = height * width
    cdt = _compute_dtype(x, delta, A, B, C, D, delta_bias)
    xs = cross_scan(x).reshape(batch, 4 * dim, length)
    ds = route_sequences(delta).reshape(batch, 4 * dim, length)
    dys = cross_scan(dy.to(cdt)).reshape(batch, 4 * dim, length)  # adjoint of the merge
    du, dd, dA, dB, dC, dD, _, dbias = scan_core_bwd(
        dys, xs, ds, A, route_sequences(B), route_sequences(C), D, None, delta_bias,
        delta_softplus, cdt)
    dx = unroute(du.reshape(batch, 4, dim, length), height, width).sum(1)
    ddelta = unroute(dd.reshape(batch, 4, dim, length), height, width)
    dB = unroute(dB, height, width)
    dC = unroute(dC, height, width)
    grads = (dx, ddelta, dA, dB, dC, dD, dbias)
    inputs = (x, delta, A, B, C, D, delta_bias)
    return tuple(None if g is None else g.to(t.dtype) for g, t in zip(grads, inputs, strict=True))


def _bidir_canonical(u, delta, A, B, C, D, delta_bias):
    """Direction 1 flipped and stacked after direction 0 as a second group: (b, 2*dim, L)."""
    batch, _, dim, length = u.shape
    us = torch.cat([u[:, 0], u[:, 1].flip(-1)], dim=1)
    ds = torch.cat([delta[:, 0], delta[:, 1].flip(-1)], dim=1)
    Bs = torch.stack([B[:, 0], B[:, 1].flip(-1)], dim=1)
    Cs = torch.stack([C[:, 0], C[:, 1].flip(-1)], dim=1)
    As = A.reshape(2 * dim, -1)
    Ds = None if D is None else D.reshape(2 * dim)
    bs = None if delta_bias is None else delta_bias.reshape(2 * dim)
    return us, ds, As, Bs, Cs, Ds, bs


def _bidir_sum(ys, dim):
    """(b, 2*dim, L) with direction 1 flipped -> y_0 + y_1 in natural order."""
    return ys[:, :dim] + ys[:, dim:].flip(-1)


def bidir_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """Both directions as one grouped chunked scan; returns (b, dim, L) in u.dtype."""
    dim = u.shape[2]
    cdt = _compute_dtype(u, delta, A, B, C, D, z, delta_bias)
    args = _bidir_canonical(u, delta, A, B, C, D, delta_bias)
    ys, _ = scan_core_fwd(*args[:6], args[6], delta_softplus, cdt)
    y = _bidir_sum(ys, dim)
    if z is not None:
        y = y * F.silu(z.to(cdt))
    return y.to(u.dtype)


def bidir_bwd(dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """Return (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias) for ``bidir_fwd``."""
    batch, _, dim, length = u.shape
    cdt = _compute_dtype(u, delta, A, B, C, D, z, delta_bias)
    us, ds, As, Bs, Cs, Ds, bs = _bidir_canonical(u, delta, A, B, C, D, delta_bias)
    dout = dout.to(cdt)
    dz = None
    if z is not None:
        ys, _ = scan_core_fwd(us, ds, As, Bs, Cs, Ds, bs, delta_softplus, cdt)
        y = _bidir_sum(ys, dim)
        zc = z.to(cdt)
        sig = torch.sigmoid(zc)
        dz = dout * y * sig * (1 + zc * (1 - sig))
        dout = dout * zc * sig
    dys = torch.cat([dout, dout.flip(-1)], dim=1)
    du, dd, dA, dB, dC, dD, _, dbias = scan_core_bwd(dys, us, ds, As, Bs, Cs, Ds, None, bs,
                                                     delta_softplus, cdt)

    def split(t):  # (b, 2*dim, L) with direction 1 flipped -> (b, 2, dim, L) natural order
        return torch.stack([t[:, :dim], t[:, dim:].flip(-1)], dim=1)

    grads = (split(du), split(dd), dA.reshape(2, dim, -1),
             torch.stack([dB[:, 0], dB[:, 1].flip(-1)], dim=1),
             torch.stack([dC[:, 0], dC[:, 1].flip(-1)], dim=1),
             None if dD is None else dD.reshape(2, dim), dz,
             None if dbias is None else dbias.reshape(2, dim))
    inputs = (u, delta, A, B, C, D, z, delta_bias)
    return tuple(None if g is None else g.to(t.dtype) for g, t in zip(grads, inputs, strict=True))
