"""Vision Mamba (Vim): bidirectional state-space model over ViT-style patch tokens.

Paper: "Vision Mamba: Efficient Visual Representation Learning with Bidirectional State Space
Model", Zhu et al., ICML 2024, https://arxiv.org/abs/2401.09417
Upstream code: https://github.com/hustvl/Vim (``vim/models_mamba.py``; the bimamba-v2 mixer in
``mamba-1p1p1/mamba_ssm/modules/mamba_simple.py``; the dense-feature recipe in
``seg/backbone/vim.py``).

A re-implementation of the released mid-class-token models (``vim_t_midclstok_76p1acc.pth``,
``vim_s_midclstok_80p5acc.pth``, the base one, and the stride-8 "+" fine-tunes) with the
official parameter names, so their ``'model'`` state dicts load strictly. Differences from the
official code, all at run time only:

* Any input H x W, non-square included. The position embedding is resampled to the token grid
  with the class-token slot (index M // 2, not 0) kept out of the interpolation and re-inserted
  in the middle; it is computed once per grid and cached (identity at the training grid).
* Both scan directions run in one ``mamba_perception_kernels.bidir_scan`` call on the natural
  token order, on token-major (channels innermost) maps. The backward branch's causal conv1d
  over the reversed sequence is computed as an anti-causal conv over the natural order
  (flipped 4-tap kernel, right padding), so no reversed copy of the activations is made.
* No mamba_ssm RMSNorm / causal-conv1d extensions: RMSNorm in plain PyTorch (fp32), both
  directions' convs + SiLU in our ``dwconv1d_bidir_silu`` op (one Triton pass on CUDA), the
  residual stream in fp32 (``residual_in_fp32`` of the released models).
"""

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
import torch.nn.functional as F

from .layers import (
    DropPath,
    RMSNorm,
    conv_out_size,
    mamba_dt_init,
    resample_pos_embed_grid,
    s4d_real_log,
    trunc_normal_,
)


def _bidir_scan(*args, **kwargs):
    # Imported on first use so that building a model (e.g. to count parameters) needs no kernels.
    from mamba_perception_kernels import bidir_scan

    return bidir_scan(*args, **kwargs)


def _dwconv1d_bidir_silu(*args):
    from mamba_perception_kernels import dwconv1d_bidir_silu

    return dwconv1d_bidir_silu(*args)


class BiMambaMixer(nn.Module):
    """The "bimamba v2" mixer: shared in/out projections, two independent SSM parameter sets.

    Official names: ``in_proj``, ``conv1d``, ``x_proj``, ``dt_proj``, ``A_log``, ``D`` for the
    forward direction and ``conv1d_b``, ``x_proj_b``, ``dt_proj_b``, ``A_b_log``, ``D_b`` for the
    backward one; ``out_proj``. Output = out_proj((y_fwd + y_bwd) / 2) (``if_divide_out``).
    """

    # The dt biases enter the scan as fp32 delta_bias: see layers.cast_autocast_weights.
    autocast_fp32 = ('dt_proj.bias', 'dt_proj_b.bias')

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank='auto', divide_out: bool = True):
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.d_inner = e = int(expand * d_model)
        self.dt_rank = r = math.ceil(d_model / 16) if dt_rank == 'auto' else int(dt_rank)
        self.divide_out = divide_out

        self.in_proj = nn.Linear(d_model, 2 * e, bias=False)
        for suffix in ('', '_b'):
            conv = nn.Conv1d(e, e, kernel_size=d_conv, groups=e, padding=d_conv - 1, bias=True)
            x_proj = nn.Linear(e, r + 2 * d_state, bias=False)
            dt_proj = nn.Linear(r, e, bias=True)
            a_log = nn.Parameter(s4d_real_log(e, d_state))
            d = nn.Parameter(torch.ones(e))
            a_log._no_weight_decay = True
            d._no_weight_decay = True
            setattr(self, f'conv1d{suffix}', conv)
            setattr(self, f'x_proj{suffix}', x_proj)
            setattr(self, f'dt_proj{suffix}', dt_proj)
            setattr(self, 'A_log' if not suffix else 'A_b_log', a_log)
            setattr(self, 'D' if not suffix else 'D_b', d)
        weight, bias = mamba_dt_init(e, r)
        with torch.no_grad():
            self.dt_proj.weight.copy_(weight)
            self.dt_proj.bias.copy_(bias)
        self.dt_proj.bias._no_reinit = True
        self.out_proj = nn.Linear(e, d_model, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Mix tokens ``h`` (B, L, D) -> (B, L, D).

        Every map stays token-major (channels innermost) from in_proj to out_proj; the scan
        reads channel-first views of them (its "seq" kernels walk contiguous channel vectors)
        and returns y as a view of a (B, L, E) buffer: no layout copies.
        """
        n, r = self.d_state, self.dt_rank
        xz = self.in_proj(h)  # [B, L, 2E]
        x, z = xz.split(self.d_inner, dim=-1)
        # Both directions' convs + SiLU in one pass. Forward: causal (left pad k-1), as the
        # official conv1d. Backward: the official code runs a causal conv on the reversed
        # sequence and flips back, which equals an anti-causal conv with the flipped kernel
        # on the natural order: no reversed copy.
        u = _dwconv1d_bidir_silu(  # [B, 2, L, E]
            x, torch.stack((self.conv1d.weight[:, 0], self.conv1d_b.weight[:, 0].flip(-1))),
            torch.stack((self.conv1d.bias, self.conv1d_b.bias)))
        w_x = torch.stack((self.x_proj.weight, self.x_proj_b.weight))  # [2, R+2N, E]
        d_skip = torch.stack((self.D, self.D_b)).float()
        if self.divide_out:
            # y = (C·h + D·u) * silu(z) is linear in C and D: halving their weights halves y
            # exactly (a power of two), with no pass over y (a whole (B, L, E) read + write).
            w_x = torch.cat((w_x[:, :r + n], w_x[:, r + n:] * 0.5), dim=1)
            d_skip = d_skip * 0.5
        x_dbl = torch.matmul(u, w_x.to(u.dtype).transpose(1, 2))  # [B, 2, L, R+2N]
        dt, b, c = torch.split(x_dbl, [r, n, n], dim=-1)
        w_dt = torch.stack((self.dt_proj.weight, self.dt_proj_b.weight)).to(u.dtype)  # [2, E, R]
        delta = torch.matmul(dt, w_dt.transpose(1, 2))  # [B, 2, L, E]
        y = _bidir_scan(
            u.transpose(2, 3), delta.transpose(2, 3),
            -torch.exp(torch.stack((self.A_log, self.A_b_log)).float()),
            b.transpose(2, 3), c.transpose(2, 3),
            D=d_skip,
            z=z.transpose(1, 2),
            delta_bias=torch.stack((self.dt_proj.bias, self.dt_proj_b.bias)).float(),
            delta_softplus=True,
        ).transpose(1, 2)  # [B, L, E] = (y_f + y_b) * silu(z), halved with divide_out
        if not torch.is_autocast_enabled(y.device.type):
            y = y.to(self.out_proj.weight.dtype)
        return self.out_proj(y)

class Block(nn.Module):
    """Add -> RMSNorm -> mixer, returning (mixer output, fp32 residual) as the official Block."""

    def __init__(self, dim: int, d_state: int = 16, drop_path: float = 0.0, eps: float = 1e-5,
                 residual_in_fp32: bool = True):
        super().__init__()
        self.mixer = BiMambaMixer(dim, d_state=d_state)
        self.norm = RMSNorm(dim, eps=eps)
        self.drop_path = DropPath(drop_path)
        self.residual_in_fp32 = residual_in_fp32

    def forward(self, h: torch.Tensor, residual: Optional[torch.Tensor]
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """One layer: ``residual += drop_path(h)``; ``h = mixer(norm(residual))``."""
        residual = h if residual is None else residual + self.drop_path(h)
        if self.residual_in_fp32:
            residual = residual.float()
        return self.mixer(self.norm(residual)), residual


class PatchEmbed(nn.Module):
    """Conv patchify (kernel ``patch_size``, stride ``stride``); no size assertion."""

    def __init__(self, patch_size: int = 16, stride: int = 16, in_chans: int = 3,
                 embed_dim: int = 192):
        super().__init__()
        self.patch_size = patch_size
        self.stride = stride
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride)

    def grid(self, height: int, width: int) -> Tuple[int, int]:
        """Token grid (rows, cols) for an H x W input."""
        return (conv_out_size(height, self.patch_size, self.stride),
                conv_out_size(width, self.patch_size, self.stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, rows * cols, D), row-major tokens."""
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, D, gh, gw] -> [B, gh*gw, D]


class VisionMamba(nn.Module):
    """Vim with a class token in the middle of the sequence and an absolute position embedding.

    Args:
        img_size: training resolution, which fixes the stored position-embedding grid.
        patch_size, stride: patch-embed conv kernel and stride (stride 8 for the "+" models).
        embed_dim, depth, d_state: model width, layers, SSM state size.
        num_classes: classifier outputs; 0 drops ``head``.
        drop_rate, drop_path_rate: dropout after the position embedding; stochastic depth.
        out_indices: layers whose mixer outputs :meth:`forward_intermediates` returns
            (the seg recipe's 5, 11, 17, 23 by default).
        fpn: build the learned multi-scale adapter of the official segmentation backbone
            (``fpn1`` = ConvT-BN-GELU-ConvT, ``fpn2`` = ConvT, ``fpn3`` = identity, ``fpn4`` =
            max-pool); without it the four maps are resampled parameter-free (nearest upsampling
            / max-pooling) to the same strides.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        stride: int = 16,
        embed_dim: int = 192,
        depth: int = 24,
        d_state: int = 16,
        num_classes: int = 1000,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-5,
        residual_in_fp32: bool = True,
        out_indices: Sequence[int] = (5, 11, 17, 23),
        fpn: bool = False,
        in_chans: int = 3,
    ):
        super().__init__()
        self.embed_dim = self.num_features = embed_dim
        self.num_classes = num_classes
        self.img_size = img_size
        self.patch_embed = PatchEmbed(patch_size, stride, in_chans, embed_dim)
        self.pretrain_grid = self.patch_embed.grid(img_size, img_size)
        num_patches = self.pretrain_grid[0] * self.pretrain_grid[1]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        # Official: dpr = linspace(0, rate, depth); layer i uses [0] + dpr at index i.
        inter_dpr = [0.0] + [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.layers = nn.ModuleList([
            Block(embed_dim, d_state=d_state, drop_path=inter_dpr[i], eps=norm_eps,
                  residual_in_fp32=residual_in_fp32)
            for i in range(depth)
        ])
        self.drop_path = DropPath(drop_path_rate)
        self.norm_f = RMSNorm(embed_dim, eps=norm_eps)

        self.out_indices = [i % depth for i in out_indices]
        if len(self.out_indices) != 4:
            raise ValueError(f'out_indices must name 4 layers, got {list(out_indices)}')
        token_stride = stride
        if token_stride not in (8, 16):
            raise ValueError(f'dense features need a token stride of 8 or 16, got {stride}')
        self.token_stride = token_stride
        self.feature_info: List[Dict] = [
            dict(num_chs=embed_dim, reduction=red, module=f'layers.{i}')
            for i, red in zip(self.out_indices, (4, 8, 16, 32), strict=True)
        ]
        self.has_fpn = fpn
        if fpn:
            self._build_fpn(embed_dim, token_stride)
        self._pos_cache: Dict[tuple, torch.Tensor] = {}
        self._init_weights(depth)

    def _build_fpn(self, dim: int, token_stride: int) -> None:
        # Official VisionMambaSeg adapter (SyncBatchNorm -> BatchNorm2d for single-device use).
        if token_stride == 16:
            self.fpn1 = nn.Sequential(
                nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2), nn.BatchNorm2d(dim),
                nn.GELU(), nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2))
            self.fpn2 = nn.Sequential(nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2))
            self.fpn3 = nn.Identity()
            self.fpn4 = nn.MaxPool2d(kernel_size=2, stride=2)
        else:
            self.fpn1 = nn.Sequential(nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2))
            self.fpn2 = nn.Identity()
            self.fpn3 = nn.Sequential(nn.MaxPool2d(kernel_size=2, stride=2))
            self.fpn4 = nn.Sequential(nn.MaxPool2d(kernel_size=4, stride=4))

    def _init_weights(self, depth: int) -> None:
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                if name.endswith('out_proj'):
                    # mamba_ssm _init_weights with rescale_prenorm_residual
                    nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5))
                    with torch.no_grad():
                        m.weight /= math.sqrt(depth)
                elif name == 'head':
                    trunc_normal_(m.weight, std=0.02)
                if m.bias is not None and not getattr(m.bias, '_no_reinit', False):
                    nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self):
        """Parameters excluded from weight decay (official list)."""
        return {'pos_embed', 'cls_token'}

    # ---- position embedding ------------------------------------------------------------------

    def pos_embed_for_grid(self, grid: Tuple[int, int]) -> torch.Tensor:
        """Position embedding (1, rows*cols + 1, D) for a token grid, class slot in the middle.

        The stored parameter itself at the training grid. Other grids are bicubic-resampled from
        it once and cached (per grid, device and dtype) while no gradient is needed; the cache
        is keyed on the parameter's version counter, so loading new weights invalidates it.
        """
        grid = (int(grid[0]), int(grid[1]))
        if grid == tuple(self.pretrain_grid):
            return self.pos_embed
        num_old = self.pretrain_grid[0] * self.pretrain_grid[1]
        if torch.is_grad_enabled() and self.pos_embed.requires_grad:
            return resample_pos_embed_grid(self.pos_embed, self.pretrain_grid, grid,
                                           cls_index=num_old // 2)
        key = (grid, self.pos_embed.device, self.pos_embed.dtype,
               self.pos_embed.data_ptr(), self.pos_embed._version)
        cached = self._pos_cache.get(key)
        if cached is None:
            with torch.no_grad():
                cached = resample_pos_embed_grid(self.pos_embed, self.pretrain_grid, grid,
                                                 cls_index=num_old // 2)
            self._pos_cache = {k: v for k, v in self._pos_cache.items() if k[1:] == key[1:]}
            self._pos_cache[key] = cached
        return cached

    # ---- forward ------------------------------------------------------------------------------

    def _tokens(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int], int]:
        grid = self.patch_embed.grid(x.shape[-2], x.shape[-1])
        if grid[0] < 1 or grid[1] < 1:
            raise ValueError(f'input {tuple(x.shape[-2:])} is smaller than one patch')
        tokens = self.patch_embed(x)  # [B, M, D]
        m = tokens.shape[1]
        cls_at = m // 2
        cls = self.cls_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype)
        tokens = torch.cat((tokens[:, :cls_at], cls, tokens[:, cls_at:]), dim=1)  # [B, M+1, D]
        tokens = self.pos_drop(tokens + self.pos_embed_for_grid(grid))
        return tokens, grid, cls_at

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image (B, 3, H, W) -> normed tokens (B, M + 1, D), class token at index M // 2."""
        h, _, _ = self._tokens(x)
        residual = None
        for layer in self.layers:
            h, residual = layer(h, residual)
        residual = residual + self.drop_path(h)
        return self.norm_f(residual)  # fp32 when residual_in_fp32

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens -> logits from the middle class token."""
        x = x[:, (x.shape[1] - 1) // 2]
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Image (B, 3, H, W) -> logits (B, num_classes)."""
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self, x: torch.Tensor, indices: Optional[Sequence[int]] = None
    ) -> List[torch.Tensor]:
        """Dense features for detection / segmentation, the Vim paper's UperNet recipe.

        The mixer outputs of layers ``out_indices`` (not the residual stream, as the official
        ``VisionMambaSeg``) with the class token removed, reshaped to the token grid
        (stride = patch stride) and resampled to strides 4, 8, 16, 32 by the ``fpn`` adapter
        (learned when built with ``fpn=True``, else nearest upsampling / max-pooling).

        Args:
            x: image (B, 3, H, W), any H and W.
            indices: which of the 4 outputs to return (default all); the forward stops after
                the last layer needed.

        Returns:
            NCHW maps of ``embed_dim`` channels; the stride-16 map has the token grid's size
            (floor((H - patch) / stride) + 1 rows), the others are 4x, 2x and 0.5x of it.
        """
        take = list(range(4)) if indices is None else [i % 4 for i in indices]
        last_layer = max(self.out_indices[i] for i in take)
        h, (gh, gw), cls_at = self._tokens(x)
        feats = {}
        residual = None
        for i, layer in enumerate(self.layers):
            h, residual = layer(h, residual)
            if i in self.out_indices:
                tokens = torch.cat((h[:, :cls_at], h[:, cls_at + 1:]), dim=1)  # drop class token
                feats[i] = tokens.transpose(1, 2).reshape(h.shape[0], -1, gh, gw)  # NCHW
            if i == last_layer:
                break
        outs = []
        for j in take:
            f = feats[self.out_indices[j]]
            outs.append(self._resample(j, f).contiguous())
        return outs

    def _resample(self, j: int, f: torch.Tensor) -> torch.Tensor:
        if self.has_fpn:
            op = (self.fpn1, self.fpn2, self.fpn3, self.fpn4)[j]
            return op(f)
        scale = self.token_stride // (4, 8, 16, 32)[j]  # >1 upsample, else pool by 1/scale
        if scale > 1:
            return F.interpolate(f, scale_factor=scale, mode='nearest')
        pool = (4, 8, 16, 32)[j] // self.token_stride
        return f if pool == 1 else F.max_pool2d(f, kernel_size=pool, stride=pool)


# --------------------------------------------------------------------------------------------
# Official checkpoints


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor],
                         model: Optional[nn.Module] = None) -> Dict[str, torch.Tensor]:
    """Map an official Vim state dict onto this file's key names.

    The released checkpoints use this file's names already. Older rope-trained checkpoints carry
    ``rope.freqs_cos`` / ``rope.freqs_sin`` buffers (derived values, no weights); they are
    dropped. Returns a new dict.
    """
    return {k: v for k, v in state_dict.items() if not k.startswith('rope.')}


# --------------------------------------------------------------------------------------------
# Configurations (official registered names in the comments) and builders

MODEL_CONFIGS = {
    # vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2
    'vim_tiny': dict(embed_dim=192, depth=24),
    # vim_small_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2
    'vim_small': dict(embed_dim=384, depth=24),
    # vim_base_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_middle_cls_token_div2
    'vim_base': dict(embed_dim=768, depth=24),
    # vim_tiny_patch16_stride8_224_... ("Vim-tiny+", vim_t_midclstok_ft_78p3acc.pth)
    'vim_tiny_plus': dict(embed_dim=192, depth=24, stride=8),
    # vim_small_patch16_stride8_224_... ("Vim-small+", vim_s_midclstok_ft_81p6acc.pth)
    'vim_small_plus': dict(embed_dim=384, depth=24, stride=8),
    # tiny test variant for CI
    'vim_test': dict(embed_dim=32, depth=4, d_state=4, img_size=64, out_indices=(0, 1, 2, 3)),
}


def _create(name: str, **kwargs) -> VisionMamba:
    args = dict(MODEL_CONFIGS[name])
    args.update(kwargs)  # caller wins
    return VisionMamba(**args)


def vim_tiny(**kwargs) -> VisionMamba:
    """Vim-T: D=192, 24 layers, patch 16."""
    return _create('vim_tiny', **kwargs)


def vim_small(**kwargs) -> VisionMamba:
    """Vim-S: D=384, 24 layers, patch 16."""
    return _create('vim_small', **kwargs)


def vim_base(**kwargs) -> VisionMamba:
    """Vim-B: D=768, 24 layers, patch 16."""
    return _create('vim_base', **kwargs)


def vim_tiny_plus(**kwargs) -> VisionMamba:
    """Vim-T+: Vim-T with patch stride 8 (27x27 tokens at 224)."""
    return _create('vim_tiny_plus', **kwargs)


def vim_small_plus(**kwargs) -> VisionMamba:
    """Vim-S+: Vim-S with patch stride 8."""
    return _create('vim_small_plus', **kwargs)


def vim_test(**kwargs) -> VisionMamba:
    """Tiny Vim for tests: D=32, 4 layers, d_state 4, 64x64 training grid."""
    return _create('vim_test', **kwargs)
