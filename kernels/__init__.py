"""Selective-scan kernels: PyTorch reference, chunked CPU path and fused Triton kernels.

Installed as ``mamba_perception_kernels`` (``import mamba_perception_kernels``).

Public ops (each scan has a sequential ``*_ref`` twin with the same signature, the test oracle;
the conv's oracle is ``F.conv2d``):

* ``selective_scan``: Mamba-1 selective scan, grouped B/C (mamba_ssm's convention).
* ``ss2d_scan``: VMamba's cross-scan + 4-route scan + cross-merge as one op.
* ``ss2d_scan_lowrank``: the same for channels-last maps with Δ given as its low-rank factors
  (VMamba's x_proj output and dt_projs weight): the Δ projection is part of the op.
* ``bidir_scan``: Vim's forward + backward scan as one op.
* ``dwconv2d_nhwc``: depthwise conv (+ bias, + SiLU) on a channels-last map, VMamba's conv
  before the scan (``dwconv.py``); ``dwconv1d_bidir_silu``: Vim's causal + anti-causal 1-D
  convs (+ bias, + SiLU) of a token-major map, both directions in one pass.
* ``norm_mlp_residual``: ``x [+ branch] + fc2(gelu(fc1(layer_norm(x [+ branch]))))`` in one
  pass (inference; the second half of a VMamba block and the first half's residual add,
  ``prenorm.py``); ``norm_linear_residual``: ``residual + linear(layer_norm(y))`` (the end of
  the SS2D mixer and its residual add).
* ``conv_norm_stem``: VMamba's patch embedding, conv -> LayerNorm -> GELU -> conv ->
  LayerNorm, in one pass (inference, ``stem.py``).
* ``resize_tap_sum``: a 3x3 conv of bilinearly upsampled maps from per-tap 1x1 products taken
  at the maps' own resolution (+ base, + per-channel affine, + ReLU): UperNet's fusion conv
  (inference, ``resize.py``).

``backend_name(device)`` tells which implementation runs for a device: ``'triton'`` on CUDA,
``'torch-chunked'`` elsewhere. Triton is imported only when a CUDA tensor reaches an op.
All are ``torch.library`` custom ops (``torch.ops.mamba_perception.*``) with fake impls and
(except the inference-only ``prenorm.py``, ``resize.py`` and ``stem.py`` ops) registered
backward passes, so autograd, ``torch.compile`` and ``torch.export`` treat each as one node.
"""

from __future__ import annotations

from . import dispatch as _dispatch
from .dispatch import MAX_DSTATE, backend_name
from .dwconv import dwconv1d_bidir_silu, dwconv2d_nhwc
from .errors import ScanInputError
from .ops import bidir_scan_op, selective_scan_op, ss2d_scan_lowrank_op, ss2d_scan_op
from .prenorm import norm_linear_residual, norm_mlp_residual
from .reference import (
    bidir_scan_ref,
    expand_lowrank,
    selective_scan_ref,
    ss2d_scan_lowrank_ref,
    ss2d_scan_ref,
)
from .resize import resize_tap_sum
from .stem import conv_norm_stem

__all__ = [
    "MAX_DSTATE",
    "ScanInputError",
    "backend_name",
    "bidir_scan",
    "conv_norm_stem",
    "bidir_scan_ref",
    "dwconv1d_bidir_silu",
    "dwconv2d_nhwc",
    "norm_linear_residual",
    "norm_mlp_residual",
    "resize_tap_sum",
    "expand_lowrank",
    "selective_scan",
    "selective_scan_ref",
    "ss2d_scan",
    "ss2d_scan_lowrank",
    "ss2d_scan_lowrank_ref",
    "ss2d_scan_ref",
]


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False):
    """Mamba-1 selective scan (math of mamba_ssm's ``selective_scan_ref``).

    Shapes::

        u, delta:   (batch, dim, L)      fp32 / fp16 / bf16, any strides
        A:          (dim, N)             fp32, 1 <= N <= MAX_DSTATE
        B, C:       (batch, G, N, L)     dim % G == 0; group g serves channels
                                         [g*dim/G, (g+1)*dim/G)
        D:          (dim,)               fp32, optional skip
        z:          (batch, dim, L)      optional gate: out = y * silu(z)
        delta_bias: (dim,)               fp32, optional
        returns     out (batch, dim, L) in u.dtype [, last_state (batch, dim, N) fp32]

    Raises ScanInputError (a ValueError) naming the offending tensor.
    """
    _dispatch.check_selective_scan(u, delta, A, B, C, D, z, delta_bias)
    out, last = selective_scan_op(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus))
    return (out, last) if return_last_state else out


def ss2d_scan(x, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True, out_dtype=None):
    """VMamba SS2D: cross-scan + selective scan over 4 routes + cross-merge, one op.

    Shapes::

        x:              (batch, dim, H, W)     any strides (channels_last is read in place)
        delta:          (batch, 4, dim, H, W)  route k's raw delta at pixel (h, w)
        B, C:           (batch, 4, N, H, W)    route k's B / C at pixel (h, w)
        A:              (4*dim, N) fp32        route-major (row k*dim + c)
        D, delta_bias:  (4*dim,) fp32          route-major
        returns         y (batch, dim, H, W) in out_dtype (default x.dtype), the sum of the
                        4 routes' scan outputs at each pixel

    Routes: k=0 row-major (l = h*W + w), k=1 column-major (l = w*H + h), k=2 / k=3 the
    reverses of k=0 / k=1 (VMamba's CrossScan / CrossMerge).
    """
    _dispatch.check_ss2d(x, delta, A, B, C, D, delta_bias)
    out_dtype = x.dtype if out_dtype is None else out_dtype
    _dispatch.check_out_dtype(out_dtype)
    return ss2d_scan_op(x, delta, A, B, C, D, delta_bias, bool(delta_softplus), out_dtype)


def ss2d_scan_lowrank(x, x_proj, dt_weight, A, D=None, dt_bias=None, delta_softplus=True,
                      out_dtype=None, a_is_log=False, parts=1, norm_weight=None, norm_bias=None,
                      norm_eps=1e-5, x_proj_weight=None):
    """VMamba SS2D on a channels-last map with the Δ projection part of the op.

    Equal to ``ss2d_scan`` on ``expand_lowrank(x, x_proj, dt_weight, N)`` (output NHWC)::

        x:          (batch, H, W, dim)          channels-last (channel stride 1 is the fast case)
        x_proj:     (batch, H, W, 4*(R + 2N))   per pixel, route k's [dt (R), B (N), C (N)]
                                                at channel k*(R+2N): VMamba's x_proj output
        dt_weight:  (4, dim, R)                 Δ_k[c] = sum_r dt_k[r] * dt_weight[k, c, r]
        A:          (4*dim, N) fp32             route-major, as in ``ss2d_scan``; with
                                                ``a_is_log``, log(-A) (VMamba's A_logs)
        D, dt_bias: (4*dim,) fp32
        returns     y (batch, H, W, dim) contiguous, in out_dtype (default x.dtype)

    On CUDA ``triton.ss2d_lowrank.TUNING['impl']`` picks how: "seq" (default, N = 1) walks
    segments of each route step by step on the NHWC map itself, with Δ projected in the walk
    (small ranks) or by one GEMM; "expanded" (any N, and "seq"'s fallback for N > 1) expands
    Δ with one GEMM and runs the ``ss2d_scan`` kernels on channel-first copies. Elsewhere Δ is
    expanded and the chunked PyTorch path runs. ``a_is_log``: the "seq" kernels compute
    A = -exp(A_log) themselves, so a model need not launch that elementwise kernel per call.

    ``parts=2`` (inference): (2, batch, H, W, dim), two maps whose sum is y. The
    "seq" kernels then write the row routes (with D·u) and the column routes to one part each
    in a single launch instead of adding the columns onto the rows in a second; a consumer
    compiled with the sum (VMamba's out_norm under torch.compile) reads both once. Other
    paths return (y, 0). No backward: only the sum has a defined gradient.

    ``norm_weight``, ``norm_bias`` (dim,) (inference, parts=1): return LayerNorm(y) with them
    and ``norm_eps`` instead (VMamba's out_norm, computed in fp32 from the fp32 sum). "seq"
    normalises each pixel in its last output walk where one program holds all channels
    (``TUNING['seq_block_d']`` or fewer), so y never reaches memory; elsewhere after the scan.
    No backward.

    ``x_proj=None, x_proj_weight=`` (4, R + 2N, dim) (inference; VMamba's ``x_proj_weight``):
    the op computes x_proj = x @ x_proj_weight.reshape(-1, dim).T itself, in x's dtype. Where
    "seq" expands Δ by a GEMM it projects into zero-padded columns
    (``TUNING['seq_delta_k_multiple']``): with that GEMM's K a multiple of 64 cuBLAS picks
    kernels without a Memset (bf16 on sm90). No backward.
    """
    _, _, _, dim, _, _ = _dispatch.check_ss2d_lowrank(x, x_proj, dt_weight, A, D, dt_bias,
                                                       x_proj_weight)
    out_dtype = x.dtype if out_dtype is None else out_dtype
    _dispatch.check_out_dtype(out_dtype)
    if parts not in (1, 2):
        raise ScanInputError(f"parts must be 1 or 2; got parts={parts!r}")
    if (norm_weight is None) != (norm_bias is None):
        raise ScanInputError("norm_weight and norm_bias go together")
    if norm_weight is not None:
        if parts != 1:
            raise ScanInputError(f"norm_weight needs parts=1; got parts={parts!r}")
        _dispatch.check_tensor("norm_weight", norm_weight, (dim,), _dispatch.PARAM_DTYPES,
                               x.device)
        _dispatch.check_tensor("norm_bias", norm_bias, (dim,), _dispatch.PARAM_DTYPES, x.device)
    return ss2d_scan_lowrank_op(x, x_proj, dt_weight, A, D, dt_bias, bool(delta_softplus),
                                out_dtype, bool(a_is_log), int(parts), norm_weight, norm_bias,
                                float(norm_eps), x_proj_weight)


def bidir_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True):
    """Vim bidirectional scan: both directions in one op, no flip copies on GPU.

    Shapes::

        u, delta:       (batch, 2, dim, L)  direction 0 scans l = 0..L-1, direction 1 scans
                                            l = L-1..0; both given in natural order
        A:              (2, dim, N) fp32
        B, C:           (batch, 2, N, L)
        D, delta_bias:  (2, dim) fp32
        z:              (batch, dim, L)     shared gate
        returns         (batch, dim, L) in u.dtype = y_0 * silu(z) + y_1 * silu(z)

    Any strides. Token-major inputs -- channel-first views of (batch, L, dim) maps, dim
    stride 1, as Vim's block passes them -- take the fast CUDA kernels (step-by-step walks
    over contiguous channels) and get the output in the same layout: a view of a
    (batch, L, dim) buffer. Otherwise the output is contiguous (batch, dim, L).
    """
    _dispatch.check_bidir(u, delta, A, B, C, D, z, delta_bias)
    return bidir_scan_op(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus))
