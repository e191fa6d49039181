"""VMamba v2: visual state-space model with 2-D selective scan (SS2D).

Paper: "VMamba: Visual State Space Model", Liu et al., NeurIPS 2024, https://arxiv.org/abs/2401.10166
Upstream code: https://github.com/MzeroMiko/VMamba (``classification/models/vmamba.py``; the
mmdet/mmseg wrapper ``MM_VSSM`` in ``detection/model.py``).

This is a re-implementation of the released v2 configurations only (forward type ``v05_noz``:
no gate branch, d_state 1, patch-embed v2, downsample v3, MLP ratio 4). Parameter names and
shapes are those of the official canonical file, so ``vssm1_tiny_0230s``, ``vssm_small_0229`` and
``vssm_base_0229`` load strictly, and with ``backbone=True`` the model has the official
``outnorm{i}`` keys (and no classifier) of the COCO / ADE20K backbones.

Layout: the official v2 checkpoints were trained channel-first (``ln2d``, 1x1 convs); parameter
names and shapes are identical channel-last (``ln``, ``nn.Linear``), and this file runs
channel-last (NHWC) throughout, where Linear and LayerNorm are plain GEMM / row kernels and the
depthwise conv and the scan read the map in place. Feature maps handed out
by :meth:`VSSM.forward_intermediates` are NCHW and contiguous.

The dt projection, the cross-scan, the four selective scans and the cross-merge are one op,
``mamba_perception_kernels.ss2d_scan_lowrank`` (Triton on CUDA, chunked PyTorch on CPU), fed
straight from the NHWC map and the x_proj GEMM. Its output is fp32 and goes through the fp32
out-norm before it is cast, as the official "oflex" path does against fp16 overflow.
"""

from collections import OrderedDict
import math
import re
from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import nn
import torch.nn.functional as F

from .layers import DropPath, Permute, linear_gelu_tanh, mamba_dt_init, s4d_real_log, trunc_normal_

# Widest stage whose blocks use the fused norm + MLP kernel. The kernel takes up to 256 channels
# (mamba_perception_kernels.prenorm.MAX_CHANNELS), but on an H100 it beats cuBLAS + inductor
# only at C <= 128 (VMamba-T stage 1: 1.14x at 1280x720, 1.30x at 2048^2; stage 2, C = 192:
# 0.64x / 0.74x; bench/results/norm_mlp_h100.json). Read at call time (bench ablations set it).
FUSED_MLP_MAX_CHANNELS = 128
# Widest d_inner whose SS2D out_norm -> out_proj -> residual add runs as one kernel
# (norm_linear_residual, up to 256). 0 = off: on an H100 it was slower at 1280x720 (2.73 vs
# 2.67 ms with it on up to 256, bench/results/backbone_speed_tail256_h100.json); where the
# fused MLP runs, the residual add is inside that kernel instead (its branch argument).
FUSED_SS2D_TAIL_MAX_CHANNELS = 0
# The patch embedding as one op (conv_norm_stem) for inference with 16-bit weights.
FUSED_STEM = True
# Largest map (H * W steps) whose SS2D scan, when compiled for inference, returns its row and
# column routes as two fp32 parts (``ss2d_scan_lowrank(parts=2)``) that out_norm's fused kernel
# adds: one output launch per call instead of two. 0 = off. H200, VMamba-T, compiled, one
# machine (bench/results/backbone_speed_parts*_h200.json): 4096 (stages 3-4 at 1280x720 and
# 1024^2, stage 4 at 2048^2) 1.920 -> 1.895 ms at 1280x720, 2.134 -> 2.109 at 1024^2, 6.498
# both at 2048^2; 16384 (stage 2 of the smaller two, stage 3 at 2048^2 too) 1.901 / 2.100 /
# 6.583: stage 3 at 2048^2 (two 25 MB fp32 parts) is slower split.
SS2D_PARTS_MAX_STEPS = 4096
# Stages whose MLP is not fused: fc1 + GELU as one GEMM with cuBLASLt's GELU epilogue
# (layers.linear_gelu_tanh) for inference with 16-bit weights. The epilogue computes GELU's
# tanh form, at most 4.7e-4 from the exact erf GELU the models were trained with.
GELU_TANH_EPILOGUE = True
# The residual stream in the autocast dtype for inference (the stem and the fused MLP write
# it, the downsamples' fp32 LayerNorm outputs are cast once) instead of fp32, which the
# official code keeps: the stream's reads and writes in the add + LayerNorm kernels halve.
# H200, VMamba-T compiled, one process each (bench/results/backbone_speed_stream{32,16}_h200
# .json): 1.871 -> 1.815 ms at 1280x720, 2.064 -> 1.988 at 1024^2, 6.431 -> 6.190 at 2048^2,
# peak 470 -> 439 MiB; fp16 / bf16 vs fp32 rel L2 1.6e-3 / 1.3e-2 (1.2e-3 / 9.3e-3 with the
# fp32 stream). fp16 overflows at 65504 where fp32 would not: set False to keep fp32.
RESIDUAL_16BIT = True
# The SS2D scan's output (the sum of its four routes, out_norm's input) in the weights' 16-bit
# dtype for inference instead of fp32: its writes, the second output walk's read-back and
# out_norm's read halve (VMamba-T at batch 4 spends 1.3 of 5.8 ms in the output walks, H200,
# bench/results/profile_vmamba_tiny_720p_b4_h200.json), and so do the scan output maps alive
# at the 2048^2 peak. Each step's route sum is formed in fp32; each partial sum that passes
# through memory is rounded (up to four roundings, ~2^-11 each in fp16). H200, VMamba-T fp16
# compiled, one process each (bench/results/backbone_speed_scan{32,16}_h200.json): batch 1
# 1.820 -> 1.796 ms at 1280x720, 2.002 -> 1.939 at 1024^2, 6.225 -> 5.926 at 2048^2 (peak
# 438 -> 391 MiB); batch 4 5.807 -> 5.520 / 6.259 -> 5.961; fp16 / bf16 vs fp32 rel L2 1.6e-3 /
# 1.3e-2 (unchanged). Two parts at every size besides were no faster (scan16parts).
SCAN_OUT_16BIT = True
# Widest d_inner whose out_norm runs inside the SS2D scan (``ss2d_scan_lowrank(norm_weight=)``,
# inference with SCAN_OUT_16BIT): the last output walk normalises each finished fp32 route sum
# where one program holds all channels (VMamba-T's stage 1, 96), so the sum never reaches
# memory and inductor's LayerNorm kernel (2 launches, ~17 us at 1280x720) goes. 0 = off.
# Offline (sm_90a, rank 6): that walk's kernel 2072 -> 2352 SASS instructions, 90 -> 105
# registers. H200, VMamba-T fp16 compiled, one process each (bash bench/device_plan.sh
# scannorm, bench/results/backbone_speed_scannorm{0,128}_h200.json): batch 4 5.551 -> 5.512 ms
# at 1280x720, 21.90 -> 21.85 at 2048^2; batch 1 1.793 -> 1.787 / 5.913 -> 5.932; peak equal.
SCAN_NORM_MAX_CHANNELS = 128


def _inference_16bit(weight: torch.Tensor) -> bool:
    # The fused kernels serve inference with 16-bit weights (layers.cast_autocast_weights,
    # what Pipeline does for fp16 / bf16): they have no backward.
    return not torch.is_grad_enabled() and weight.dtype in (torch.float16, torch.bfloat16)


def _kernels():
    # Imported on first use so that building a model (e.g. to count parameters) needs no kernels.
    import mamba_perception_kernels

    return mamba_perception_kernels


class SS2D(nn.Module):
    """2-D selective-scan mixer, forward type ``v05_noz`` (official ``SS2D`` / ``SS2Dv2``).

    in_proj -> depthwise conv 3x3 -> SiLU -> 4-route selective scan (row, column, and their
    reverses) summed back per pixel -> LayerNorm -> out_proj. Input and output are NHWC.
    """

    k_group = 4
    # Fed to F.linear by forward itself: see layers.cast_autocast_weights.
    autocast_weights = ('x_proj_weight',)

    def __init__(
        self,
        d_model: int,
        d_state: int = 1,
        ssm_ratio: float = 1.0,
        dt_rank: Union[int, str] = 'auto',
        d_conv: int = 3,
        conv_bias: bool = False,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
    ):
        super().__init__()
        self.d_model = int(d_model)
        self.d_state = int(d_state)
        self.d_inner = d_inner = int(ssm_ratio * d_model)
        self.dt_rank = int(math.ceil(d_model / 16) if dt_rank == 'auto' else dt_rank)
        k = self.k_group

        self.in_proj = nn.Linear(d_model, d_inner, bias=False)
        self.conv2d = nn.Conv2d(d_inner, d_inner, kernel_size=d_conv, padding=(d_conv - 1) // 2,
                                groups=d_inner, bias=conv_bias)
        # One (dt_rank + 2N, d_inner) projection per route, stacked as the official file does.
        x_proj = torch.empty(k, self.dt_rank + 2 * self.d_state, d_inner)
        bound = 1.0 / math.sqrt(d_inner)  # nn.Linear's default init, which the official uses
        self.x_proj_weight = nn.Parameter(x_proj.uniform_(-bound, bound))
        dts = [mamba_dt_init(d_inner, self.dt_rank, dt_min, dt_max, dt_init_floor)
               for _ in range(k)]
        self.dt_projs_weight = nn.Parameter(torch.stack([w for w, _ in dts]))  # (K, Di, R)
        self.dt_projs_bias = nn.Parameter(torch.stack([b for _, b in dts]))  # (K, Di)
        self.A_logs = nn.Parameter(s4d_real_log(d_inner, self.d_state).repeat(k, 1))  # (K*Di, N)
        self.Ds = nn.Parameter(torch.ones(k * d_inner))  # (K*Di,)
        self.A_logs._no_weight_decay = True
        self.Ds._no_weight_decay = True
        self.out_norm = nn.LayerNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Mix ``x`` (B, H, W, C) -> (B, H, W, C)."""
        # Under torch.compile (inference) the two parts' sum is fused into out_norm's kernel;
        # eager, it would be one more kernel, so one part.
        parts = 2 if (torch.compiler.is_compiling() and not torch.is_grad_enabled()
                      and x.shape[1] * x.shape[2] <= SS2D_PARTS_MAX_STEPS) else 1
        out_dtype = (self.in_proj.weight.dtype
                     if SCAN_OUT_16BIT and _inference_16bit(self.in_proj.weight) else None)
        if parts == 1 and out_dtype is not None and self.d_inner <= SCAN_NORM_MAX_CHANNELS:
            y = self.scan(x, parts, out_dtype, norm=self.out_norm)  # out_norm(sum of routes)
            return self.out_proj(y.to(x.dtype))
        y = self.scan(x, parts, out_dtype)  # [B, H, W, Di], sum of the 4 routes
        if parts == 2:
            y = y[0].float() + y[1]  # the parts' sum in fp32 (fused into out_norm's kernel)
        y = self.out_norm(y)  # LayerNorm (fp32 under autocast)
        return self.out_proj(y.to(x.dtype))

    def scan(self, x: torch.Tensor, parts: int = 1, out_dtype: Optional[torch.dtype] = None,
             norm: Optional[nn.LayerNorm] = None) -> torch.Tensor:
        """in_proj -> conv -> SiLU -> 4-route scan: ``x`` (B, H, W, C) -> (B, H, W, Di).

        The output is fp32, or ``out_dtype`` where given. ``parts=2``: (2, B, H, W, Di), two
        maps whose sum is that. ``norm`` (inference): ``norm(output)`` instead, computed by the
        scan op.
        """
        k, n, r, di = self.k_group, self.d_state, self.dt_rank, self.d_inner
        x = self.in_proj(x)  # [B, H, W, Di]
        # Depthwise conv + the block's SiLU in one NHWC kernel (cuDNN transposes NHWC<->NCHW
        # around it).
        x = _kernels().dwconv2d_nhwc(x, self.conv2d.weight, self.conv2d.bias, silu=True)
        # The route projections are per pixel, so they run as one GEMM in the native layout and
        # the kernel does the routing: identical to projecting the cross-scanned sequences.
        # Inference hands the op the weight itself: where Δ is expanded by a GEMM the op
        # projects into zero-padded columns, which gives that GEMM a K cuBLAS serves better
        # (kernels' ss2d_lowrank TUNING seq_delta_k_multiple). Training keeps the GEMM here,
        # where autograd sees it.
        if torch.is_grad_enabled():
            x_proj = F.linear(x, self.x_proj_weight.reshape(k * (r + 2 * n), di).to(x.dtype))
            own_projection = {}
        else:
            x_proj, own_projection = None, dict(x_proj_weight=self.x_proj_weight)
        # dt_proj (rank r -> Di per route) is part of the scan op, fed the rank-r factors; so is
        # A = -exp(A_logs) (a_is_log): one elementwise kernel launch fewer per block.
        return _kernels().ss2d_scan_lowrank(
            x,
            x_proj,
            self.dt_projs_weight,
            self.A_logs.float(),
            D=self.Ds.float(),
            dt_bias=self.dt_projs_bias.reshape(-1).float(),
            delta_softplus=True,
            out_dtype=torch.float32 if out_dtype is None else out_dtype,
            a_is_log=True,
            parts=parts,
            **({} if norm is None else dict(norm_weight=norm.weight.float(),
                                            norm_bias=norm.bias.float(), norm_eps=norm.eps)),
            **own_projection,
        )


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 over the last dimension."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the MLP to ``x`` (..., C)."""
        return self.fc2(self.act(self.fc1(x)))


class VSSBlock(nn.Module):
    """Pre-norm block: ``x + SS2D(norm(x))`` then ``x + MLP(norm2(x))`` (NHWC)."""

    def __init__(self, dim: int, drop_path: float = 0.0, mlp_ratio: float = 4.0, **ssm_kwargs):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.op = SS2D(dim, **ssm_kwargs)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block to ``x`` (B, H, W, C)."""
        # The branch outputs (fp16/bf16 GEMMs) are added into the residual stream, whose dtype
        # the caller set: fp32 as in the official code (autocast's LayerNorm returns fp32), or
        # the autocast dtype (RESIDUAL_16BIT, inference).
        op = self.op
        fc1, fc2 = self.mlp.fc1, self.mlp.fc2
        exact_gelu = isinstance(self.mlp.act, nn.GELU) and self.mlp.act.approximate == 'none'
        fused_mlp = exact_gelu and self._fused(fc1.weight, x.shape[-1], FUSED_MLP_MAX_CHANNELS)
        branch = None
        if self._fused(op.out_proj.weight, op.d_inner, FUSED_SS2D_TAIL_MAX_CHANNELS):
            # out_norm -> out_proj -> + x in one kernel, on the scan's fp32 output.
            x = _kernels().norm_linear_residual(op.scan(self.norm(x)), op.out_norm.weight,
                                                op.out_norm.bias, op.out_norm.eps,
                                                op.out_proj.weight, op.out_proj.bias, x)
        elif fused_mlp:
            branch = op(self.norm(x))  # its residual add happens inside norm_mlp_residual
        else:
            x = x + self.drop_path(op(self.norm(x)))
        if fused_mlp:
            # (x + branch) -> norm2 -> fc1 -> GELU -> fc2 -> + in one kernel: neither the 4C
            # hidden activation nor x + branch reaches memory (out in the stream's dtype).
            return _kernels().norm_mlp_residual(x, self.norm2.weight, self.norm2.bias,
                                                self.norm2.eps, fc1.weight, fc1.bias,
                                                fc2.weight, fc2.bias, branch=branch,
                                                out_dtype=x.dtype)
        if exact_gelu and GELU_TANH_EPILOGUE and self._inference(fc1.weight):
            hidden = linear_gelu_tanh(self.norm2(x).to(fc1.weight.dtype), fc1.weight, fc1.bias)
            return x + self.drop_path(fc2(hidden))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def _inference(self, weight: torch.Tensor) -> bool:
        # The fused inference paths: eval mode, gradients off, 16-bit weights.
        return not self.training and _inference_16bit(weight)

    def _fused(self, weight: torch.Tensor, width: int, max_width: int) -> bool:
        # Each fused pre-norm kernel takes rows up to a width (see FUSED_*_MAX_CHANNELS).
        return width <= max_width and self._inference(weight)


def _downsample_v3(dim: int, out_dim: int) -> nn.Sequential:
    # NHWC in and out; indices 1 (conv) and 3 (norm) are the official key names.
    return nn.Sequential(
        Permute(0, 3, 1, 2),  # [B, H, W, C] -> [B, C, H, W]
        nn.Conv2d(dim, out_dim, kernel_size=3, stride=2, padding=1),
        Permute(0, 2, 3, 1),  # [B, C, H, W] -> [B, H, W, C]
        nn.LayerNorm(out_dim),
    )


class PatchEmbedV2(nn.Sequential):
    """Two 3x3 stride-2 convs, each followed by a LayerNorm over channels, GELU between.

    NCHW image in, NHWC map out; indices 0/2/5/7 are the official key names. For inference
    with 16-bit weights (what Pipeline runs) the whole stem is one op,
    ``mamba_perception_kernels.conv_norm_stem`` (two Triton kernels on CUDA, with the modules'
    roundings); its contiguous NHWC output also lets inductor fuse stage 1's add + LayerNorm
    pairs, which the modules' strided output split in two (VMamba-T 2.67 -> 2.23 ms at
    1280x720 on an H100, bench/PERF_NOTES.md).
    """

    def __init__(self, in_chans: int, dim: int):
        super().__init__(
            nn.Conv2d(in_chans, dim // 2, kernel_size=3, stride=2, padding=1),
            Permute(0, 2, 3, 1),  # -> NHWC
            nn.LayerNorm(dim // 2),
            Permute(0, 3, 1, 2),  # -> NCHW
            nn.GELU(),
            nn.Conv2d(dim // 2, dim, kernel_size=3, stride=2, padding=1),
            Permute(0, 2, 3, 1),  # -> NHWC
            nn.LayerNorm(dim),
        )

    def forward(self, x: torch.Tensor, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Image (B, Cin, H, W) -> (B, ceil(H/4), ceil(W/4), dim) NHWC [in ``out_dtype``]."""
        conv1, norm1, act, conv2, norm2 = self[0], self[2], self[4], self[5], self[7]
        if (FUSED_STEM and not self.training and _inference_16bit(conv1.weight)
                and isinstance(act, nn.GELU) and act.approximate == 'none'):
            return _kernels().conv_norm_stem(x, conv1.weight, conv1.bias, norm1.weight,
                                             norm1.bias, norm1.eps, conv2.weight, conv2.bias,
                                             norm2.weight, norm2.bias, norm2.eps,
                                             out_dtype=out_dtype)
        x = super().forward(x)
        return x if out_dtype is None else x.to(out_dtype)


class VSSM(nn.Module):
    """VMamba v2 classifier / backbone.

    Args:
        depths: blocks per stage.
        dims: channels of stage 0 (int, doubled per stage) or of every stage.
        ssm_d_state, ssm_ratio, ssm_dt_rank, ssm_conv, ssm_conv_bias: SS2D settings.
        mlp_ratio: MLP hidden width / channels.
        drop_path_rate: stochastic depth, linearly increasing over all blocks.
        num_classes: classifier outputs; 0 drops the ``classifier.head`` Linear.
        backbone: dense-task layout of the official mmdet/mmseg ``MM_VSSM``: adds ``outnorm{i}``
            (LayerNorm of each stage output) and has no ``classifier`` at all.
        in_chans: input channels.
    """

    output_fmt = 'NHWC'  # of forward_features; forward_intermediates returns NCHW

    def __init__(
        self,
        depths: Sequence[int] = (2, 2, 8, 2),
        dims: Union[int, Sequence[int]] = 96,
        ssm_d_state: int = 1,
        ssm_ratio: float = 1.0,
        ssm_dt_rank: Union[int, str] = 'auto',
        ssm_conv: int = 3,
        ssm_conv_bias: bool = False,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.2,
        num_classes: int = 1000,
        backbone: bool = False,
        in_chans: int = 3,
    ):
        super().__init__()
        if isinstance(dims, int):
            dims = [dims * 2 ** i for i in range(len(depths))]
        self.dims = list(dims)
        self.depths = list(depths)
        self.num_features = self.dims[-1]
        self.num_classes = num_classes
        self.backbone = backbone
        total = sum(depths)
        dpr = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # linspace

        self.patch_embed = PatchEmbedV2(in_chans, self.dims[0])
        self.layers = nn.ModuleList()
        self.feature_info: List[Dict] = []
        for i, depth in enumerate(depths):
            start = sum(depths[:i])
            blocks = [
                VSSBlock(self.dims[i], drop_path=dpr[start + j], mlp_ratio=mlp_ratio,
                         d_state=ssm_d_state, ssm_ratio=ssm_ratio, dt_rank=ssm_dt_rank,
                         d_conv=ssm_conv, conv_bias=ssm_conv_bias)
                for j in range(depth)
            ]
            last = i == len(depths) - 1
            downsample = nn.Identity() if last else _downsample_v3(self.dims[i], self.dims[i + 1])
            self.layers.append(nn.Sequential(OrderedDict(
                blocks=nn.Sequential(*blocks), downsample=downsample)))
            self.feature_info.append(
                dict(num_chs=self.dims[i], reduction=4 * 2 ** i, module=f'layers.{i}'))

        if backbone:
            for i, dim in enumerate(self.dims):
                self.add_module(f'outnorm{i}', nn.LayerNorm(dim))
            self.classifier = None
        else:
            self.classifier = nn.Sequential(OrderedDict(
                norm=nn.LayerNorm(self.num_features),
                permute=Permute(0, 3, 1, 2),  # [B, H, W, C] -> [B, C, H, W]
                avgpool=nn.AdaptiveAvgPool2d(1),
                flatten=nn.Flatten(1),
                head=nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity(),
            ))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # Official VSSM._init_weights: it reaches nn.Linear / nn.LayerNorm modules only.
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay_keywords(self):
        """Parameter-name fragments excluded from weight decay (official list)."""
        return {'A_logs', 'Ds'}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image (B, 3, H, W) -> last stage output (B, H/32, W/32, C), NHWC, before the norm."""
        stream = self._stream_dtype(x)
        x = self.patch_embed(x, stream)
        for layer in self.layers:
            x = self._downsample(layer, layer.blocks(x), stream)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """NHWC features -> logits (or pooled, normed features with ``pre_logits``)."""
        if self.classifier is None:
            raise RuntimeError('this VSSM was built with backbone=True and has no classifier')
        for name, module in self.classifier.named_children():
            if pre_logits and name == 'head':
                break
            x = module(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Image (B, 3, H, W) -> logits (B, num_classes)."""
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self, x: torch.Tensor, indices: Optional[Sequence[int]] = None
    ) -> List[torch.Tensor]:
        """Dense features: stage outputs (before downsampling) at strides 4, 8, 16, 32.

        Args:
            x: image (B, 3, H, W), any H and W.
            indices: stages to return (default all four); the forward stops after the last.

        Returns:
            NCHW maps in channels-last memory format (views of the NHWC stage outputs) of
            ``feature_info[i]['num_chs']`` channels and spatial size
            ceil(H / stride) x ceil(W / stride). With ``backbone=True`` each goes through its
            ``outnorm{i}``, as the official mmdet/mmseg wrapper does; otherwise it is the raw
            stage output. Under autocast the maps are in the autocast dtype: the heads' convs
            would round them to it anyway, and kept in fp32 the four maps alone hold 180 MiB
            at 2048x2048 (bench/activation_memory.py), more than ViT-S's whole activation peak.
        """
        device_type = x.device.type
        out_dtype = (torch.get_autocast_dtype(device_type)
                     if torch.is_autocast_enabled(device_type) else None)
        take = list(range(len(self.layers))) if indices is None else [
            i % len(self.layers) for i in indices]
        outs = []
        stream = self._stream_dtype(x)
        x = self.patch_embed(x, stream)
        for i, layer in enumerate(self.layers):
            # One name for the running map, so no earlier stage's tensors outlive their use
            # while the next stage runs (eager / CUDA-graph peak memory).
            x = layer.blocks(x)
            if i in take:
                outs.append(self._intermediate(i, x, out_dtype))
            if i == max(take):
                break
            x = self._downsample(layer, x, stream)
        return outs

    def _stream_dtype(self, image: torch.Tensor) -> Optional[torch.dtype]:
        """Return the residual stream's dtype where it is not left to autocast, else None."""
        device_type = image.device.type
        if (RESIDUAL_16BIT and not self.training and not torch.is_grad_enabled()
                and torch.is_autocast_enabled(device_type)):
            return torch.get_autocast_dtype(device_type)
        return None

    @staticmethod
    def _downsample(layer: nn.Module, x: torch.Tensor,
                    stream: Optional[torch.dtype]) -> torch.Tensor:
        x = layer.downsample(x)  # its LayerNorm returns fp32 under CUDA autocast
        return x if stream is None else x.to(stream)

    def _intermediate(self, i: int, x: torch.Tensor, dtype: Optional[torch.dtype]
                      ) -> torch.Tensor:
        out = getattr(self, f'outnorm{i}')(x) if self.backbone else x
        if dtype is not None:
            out = out.to(dtype)
        # NCHW view of the NHWC map (channels-last memory format), not an NCHW copy: the heads'
        # convs run NHWC on the GPU (cuDNN; their weights are channels-last in Pipeline), so a
        # contiguous copy here was transposed back by every conv that reads it.
        return out.permute(0, 3, 1, 2)


# --------------------------------------------------------------------------------------------
# Official checkpoints

_LEGACY_RENAMES = [
    # (pattern, replacement) from the official VSSM._load_from_state_dict
    (re.compile(r'^patch_embed\.proj\.'), 'patch_embed.0.'),
    (re.compile(r'^patch_embed\.norm\.'), 'patch_embed.2.'),
    (re.compile(r'^(layers\.\d+\.blocks\.\d+\.)ln_1\.'), r'\1norm.'),
    (re.compile(r'^(layers\.\d+\.blocks\.\d+\.)self_attention\.'), r'\1op.'),
    (re.compile(r'^norm\.'), 'classifier.norm.'),
    (re.compile(r'^head\.'), 'classifier.head.'),
]
_LINEAR_KEYS = re.compile(r'\.(op\.in_proj|op\.out_proj|mlp\.fc1|mlp\.fc2)\.weight$')


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor],
                         model: Optional[nn.Module] = None) -> Dict[str, torch.Tensor]:
    """Map an official VMamba state dict onto this file's key names.

    Applies the official load-time renames (``patch_embed.proj/norm``, ``ln_1``,
    ``self_attention``, top-level ``norm``/``head``), reshapes 1x1-conv-shaped Linear weights
    to (out, in) as the official ``Linear2d`` does, and returns a new dict (the caller's is not
    modified). Position embeddings are not supported (no released v2 model has one).
    """
    out = {}
    for key, value in state_dict.items():
        for pattern, repl in _LEGACY_RENAMES:
            key = pattern.sub(repl, key)
        if _LINEAR_KEYS.search(key) and value.ndim == 4 and value.shape[2:] == (1, 1):
            value = value.reshape(value.shape[:2])
        out[key] = value
    return out


# --------------------------------------------------------------------------------------------
# Configurations (official names in the comments) and builders

MODEL_CONFIGS = {
    # vssm1_tiny_0230s_ckpt_epoch_264.pth (T[s1l8]); 30,249,064 parameters
    'vmamba_tiny': dict(depths=(2, 2, 8, 2), dims=96, ssm_ratio=1.0, drop_path_rate=0.2),
    # vssm_small_0229_ckpt_epoch_222.pth (S[s2l15]); 50,147,752 parameters
    'vmamba_small': dict(depths=(2, 2, 15, 2), dims=96, ssm_ratio=2.0, drop_path_rate=0.3),
    # vssm_base_0229_ckpt_epoch_237.pth (B[s2l15]); 88,557,800 parameters
    'vmamba_base': dict(depths=(2, 2, 15, 2), dims=128, ssm_ratio=2.0, drop_path_rate=0.6),
    # tiny test variant for CI: every code path, a few thousand parameters
    'vmamba_test': dict(depths=(1, 1, 2, 1), dims=16, ssm_ratio=2.0, drop_path_rate=0.0),
}


def _create(name: str, **kwargs) -> VSSM:
    args = dict(MODEL_CONFIGS[name])
    args.update(kwargs)  # caller wins
    return VSSM(**args)


def vmamba_tiny(**kwargs) -> VSSM:
    """VMamba-T[s1l8]: depths 2-2-8-2, C=96, ssm_ratio 1."""
    return _create('vmamba_tiny', **kwargs)


def vmamba_small(**kwargs) -> VSSM:
    """VMamba-S[s2l15]: depths 2-2-15-2, C=96, ssm_ratio 2."""
    return _create('vmamba_small', **kwargs)


def vmamba_base(**kwargs) -> VSSM:
    """VMamba-B[s2l15]: depths 2-2-15-2, C=128, ssm_ratio 2."""
    return _create('vmamba_base', **kwargs)


def vmamba_test(**kwargs) -> VSSM:
    """Tiny VMamba for tests: depths 1-1-2-1, C=16."""
    return _create('vmamba_test', **kwargs)
