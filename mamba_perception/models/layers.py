"""Small building blocks shared by the VMamba and Vim model files.

Nothing here owns a selective scan: the scans come from ``mamba_perception_kernels``. These are
the parameter-light helpers around them (normalisation, stochastic depth, layout permutes,
position-embedding resampling).
"""

import math
from typing import Optional, Sequence

import torch
from torch import nn
import torch.nn.functional as F


class Permute(nn.Module):
    """``x.permute(*dims)`` as a module, so that it can sit inside ``nn.Sequential``.

    VMamba's official ``nn.Sequential`` blocks keep their parameter indices (``patch_embed.2``,
    ``downsample.3``) only when the layout permutes occupy their own slots.
    """

    def __init__(self, *dims: int):
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return a permuted view of ``x``."""
        return x.permute(*self.dims)

    def extra_repr(self) -> str:  # noqa: D102
        return ', '.join(str(d) for d in self.dims)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor (same parameters as ``nn.LayerNorm``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x`` (B, C, H, W) over C."""
        x = x.permute(0, 2, 3, 1)  # [B, C, H, W] -> [B, H, W, C]
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)  # [B, H, W, C] -> [B, C, H, W]


class RMSNorm(nn.Module):
    """Root-mean-square norm with a weight and no bias, computed in fp32.

    Matches mamba_ssm's ``RMSNorm`` / ``rms_norm_ref``: ``x * rsqrt(mean(x^2) + eps) * weight``.
    The output has the input's dtype unless ``out_dtype`` is given.
    """

    def __init__(self, dim: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Normalise ``x`` over its last dimension."""
        y = F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps)
        return y.to(out_dtype or x.dtype)

    def extra_repr(self) -> str:  # noqa: D102
        return f'{self.weight.shape[0]}, eps={self.eps}'


class DropPath(nn.Module):
    """Stochastic depth per sample (identity in eval mode or at rate 0)."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Zero whole samples with probability ``drop_prob`` and rescale the rest."""
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:  # noqa: D102
        return f'drop_prob={self.drop_prob}'


def trunc_normal_(tensor: torch.Tensor, std: float = 0.02) -> torch.Tensor:
    """Fill ``tensor`` from a normal truncated at +-2 std (timm's default truncation)."""
    return nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=-2 * std, b=2 * std)


def resample_pos_embed_grid(
    pos_embed: torch.Tensor,
    old_grid: Sequence[int],
    new_grid: Sequence[int],
    cls_index: Optional[int] = None,
    new_cls_index: Optional[int] = None,
) -> torch.Tensor:
    """Resample an absolute position embedding laid out on a token grid.

    Args:
        pos_embed: (1, M + k, D) with M = old_grid[0] * old_grid[1] patch slots, row-major, and
            k = 1 class-token slot at ``cls_index`` (k = 0 when ``cls_index`` is None).
        old_grid: (gh, gw) the patch slots were trained on.
        new_grid: (gh', gw') wanted.
        cls_index: index of the class-token slot in ``pos_embed`` (Vim: M // 2), or None.
        new_cls_index: where to re-insert that slot in the output (Vim: M' // 2); defaults to
            ``new_M // 2`` when ``cls_index`` is given.

    Returns:
        (1, M' + k, D) in the dtype of ``pos_embed``; the class-token slot is copied, the patch
        slots are bicubic-resampled (align_corners=False). Identity when the grids are equal.
    """
    old_h, old_w = int(old_grid[0]), int(old_grid[1])
    new_h, new_w = int(new_grid[0]), int(new_grid[1])
    if cls_index is not None:
        cls_slot = pos_embed[:, cls_index:cls_index + 1]
        patches = torch.cat((pos_embed[:, :cls_index], pos_embed[:, cls_index + 1:]), dim=1)
    else:
        cls_slot, patches = None, pos_embed
    if patches.shape[1] != old_h * old_w:
        raise ValueError(
            f'pos_embed has {patches.shape[1]} patch slots, grid {old_h}x{old_w} needs '
            f'{old_h * old_w}')
    if (old_h, old_w) != (new_h, new_w):
        dim = patches.shape[-1]
        grid = patches.reshape(1, old_h, old_w, dim).permute(0, 3, 1, 2)  # [1, D, gh, gw]
        grid = F.interpolate(grid.float(), size=(new_h, new_w), mode='bicubic',
                             align_corners=False)
        patches = grid.permute(0, 2, 3, 1).reshape(1, new_h * new_w, dim).to(pos_embed.dtype)
    if cls_slot is None:
        return patches
    at = new_h * new_w // 2 if new_cls_index is None else new_cls_index
    return torch.cat((patches[:, :at], cls_slot, patches[:, at:]), dim=1)


def conv_out_size(size: int, kernel: int, stride: int, padding: int = 0) -> int:
    """Output length of a convolution along one axis."""
    return (size + 2 * padding - kernel) // stride + 1


def inv_softplus(x: torch.Tensor) -> torch.Tensor:
    """Inverse of softplus, used by the Mamba dt-bias initialisation."""
    return x + torch.log(-torch.expm1(-x))


def mamba_dt_init(d_inner: int, dt_rank: int, dt_min: float = 1e-3, dt_max: float = 0.1,
                  dt_init_floor: float = 1e-4, dt_scale: float = 1.0):
    """Mamba's dt projection init: weight U(+-dt_rank^-0.5), bias = softplus^-1(dt).

    Returns (weight (d_inner, dt_rank), bias (d_inner,)).
    """
    std = dt_rank ** -0.5 * dt_scale
    weight = torch.empty(d_inner, dt_rank).uniform_(-std, std)
    dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min))
                   + math.log(dt_min)).clamp(min=dt_init_floor)
    return weight, inv_softplus(dt)


def s4d_real_log(d_inner: int, d_state: int) -> torch.Tensor:
    """S4D-real init of ``A_log``: log(1..N) for every channel, fp32, shape (d_inner, N)."""
    return torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1)


# Modules whose weight and bias autocast casts to the 16-bit dtype on every call (they run
# F.linear / F.conv*, both on autocast's lower-precision list).
_AUTOCAST_CAST_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d,
                          nn.ConvTranspose2d, nn.ConvTranspose3d)


def linear_gelu_tanh(x: torch.Tensor, weight: torch.Tensor,
                     bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``gelu(linear(x, weight, bias), approximate='tanh')``: on CUDA one GEMM, GELU as epilogue.

    cuBLASLt applies GELU (its tanh form) to the fp32 accumulator of the GEMM, so the 4C
    hidden activation of an MLP is written once instead of written, read and written again by
    a separate GELU kernel (VMamba-T at 1280x720: ~0.12 ms of GELU passes at stages 2-4,
    bench/PERF_NOTES.md). The tanh form differs from the exact (erf) GELU by at most 4.7e-4
    absolute. Elsewhere the same math as two ops. ``x`` and the weights share one dtype.
    """
    if x.is_cuda and bias is not None:
        rows = x.reshape(-1, x.shape[-1])
        # aten's CUDA addmm takes cuBLASLt's GELU_BIAS epilogue for this call (and computes
        # the same thing as addmm then gelu(tanh) where it cannot); inductor keeps it whole.
        out = torch._addmm_activation(bias, rows, weight.t(), use_gelu=True)
        return out.view(*x.shape[:-1], weight.shape[0])
    return F.gelu(F.linear(x, weight, bias), approximate='tanh')


def cast_autocast_weights(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Store, once, the parameters that autocast to ``dtype`` would cast on every forward.

    Under fp16 / bf16 autocast each Linear / Conv call first casts its fp32 weight and bias to
    the 16-bit dtype: one extra kernel per layer and per frame (VMamba-T: ~70 of them). Casting
    them in place gives the same arithmetic without those copies. A module may name more
    parameters in ``autocast_weights`` (raw weights it feeds to ``F.linear`` itself, e.g.
    VMamba's stacked ``x_proj_weight``) and exempt some in ``autocast_fp32`` (dotted names below
    it that it reads in fp32, e.g. Vim's ``dt_proj.bias``). Norms, scan parameters and
    everything else stay fp32, so the model must then run under autocast of ``dtype`` (a
    16-bit weight cannot meet an fp32 activation outside it). Returns ``model``.
    """
    keep = set()
    for module in model.modules():
        for name in getattr(module, 'autocast_fp32', ()):
            keep.add(id(module.get_parameter(name)))
    for module in model.modules():
        names = list(getattr(module, 'autocast_weights', ()))
        if isinstance(module, _AUTOCAST_CAST_MODULES):
            names += ['weight', 'bias']
        for name in names:
            param = getattr(module, name, None)
            if param is not None and param.is_floating_point() and id(param) not in keep:
                param.data = param.data.to(dtype)
    return model
