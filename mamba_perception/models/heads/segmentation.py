"""UperNet decode head (pyramid pooling + FPN fuse) in mmsegmentation's parameter layout.

Paper: Xiao et al., "Unified Perceptual Parsing for Scene Understanding", ECCV 2018,
https://arxiv.org/abs/1807.10221. Layout and defaults follow mmsegmentation's ``UPerHead`` and
``FCNHead`` (https://github.com/open-mmlab/mmsegmentation, ``mmseg/models/decode_heads/``) as
used by VMamba's and Vim's ADE20K configs, so that their released checkpoints load by stripping
the ``decode_head.`` prefix only:

* ``ConvModule`` = ``conv`` (no bias, because a norm follows) + ``bn`` + ReLU; keys
  ``<name>.conv.weight`` and ``<name>.bn.{weight,bias,running_mean,running_var,...}``.
* ``psp_modules.<i>`` = ``Sequential(AdaptiveAvgPool2d(scale), ConvModule)``; keys
  ``psp_modules.<i>.1.conv.weight``.
* ``conv_seg`` is the 1x1 classifier with bias; dropout (p=0.1 in training) comes before it.
* All resizes are bilinear with ``align_corners=False``.

SyncBN of the official configs becomes ``BatchNorm2d`` (same parameters and buffers).

At inference the fusion conv (``fpn_bottleneck``: a 3x3 conv over the four levels concatenated
at stride 4, ~60 % of a 1280x720 det+seg forward's FLOPs) can run its three coarse levels'
channel mixing at their own resolution (``COARSE_FUSION``): the conv is linear and the bilinear
resize mixes no channels, so for each tap t, W_t applied to the resized map equals the resized
W_t-map. Each coarse level then costs nine 1x1 products at its resolution (1/4, 1/16, 1/64 of
the pixels) plus a resize-shift-sum of the nine results (``mamba_perception_kernels.
resize_tap_sum``, one Triton kernel for all three on CUDA, with the BatchNorm and ReLU); the same
numbers up to rounding.
"""

from typing import Sequence

import torch
from torch import nn
import torch.nn.functional as F

# UPerHead's fusion conv with the coarse levels mixed at their own resolution (module
# docstring), at inference. By FLOP count 2.06 -> 1.25 TFLOP per 1280x720 det+seg frame;
# measured (H100, fp16, compiled + CUDA graphs, batch 4 at 1280x720): pipeline p50 43.8 ->
# 39.6 ms, peak memory 4510 -> 2146 MiB (bench/results/pipeline_coarse_*_h100.json). Read at
# call time (benchmarks switch it).
COARSE_FUSION = True


class ConvModule(nn.Sequential):
    """Conv (no bias) -> BatchNorm -> ReLU with mmcv's ``conv`` / ``bn`` child names."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int,
                 padding: int = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding,
                              bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.activate = nn.ReLU(inplace=True)


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize of an NCHW map, ``align_corners=False`` (mmseg's ``resize``)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode='bilinear', align_corners=False)


class PPM(nn.ModuleList):
    """Pyramid pooling: one average-pool + 1x1 ConvModule branch per pool scale."""

    def __init__(self, pool_scales: Sequence[int], in_channels: int, channels: int) -> None:
        super().__init__(
            nn.Sequential(nn.AdaptiveAvgPool2d(scale), ConvModule(in_channels, channels, 1))
            for scale in pool_scales)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Return one (B, channels, H, W) map per pool scale, upsampled back to x's size."""
        return [_resize(branch(x), x.shape[-2:]) for branch in self]


class UPerHead(nn.Module):
    """UperNet head over four NCHW maps at strides 4/8/16/32; logits at stride 4.

    Args:
        in_channels: channels of the four input maps, finest first (``feature_info`` order).
        num_classes: output classes (150 for ADE20K).
        channels: width of every internal map (512 in the VMamba configs).
        pool_scales: output sizes of the pyramid pooling branches.
        dropout_ratio: dropout before ``conv_seg`` (active in training only).
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int = 150, channels: int = 512,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout_ratio: float = 0.1) -> None:
        super().__init__()
        if len(in_channels) != 4:
            raise ValueError(f'UPerHead needs 4 input levels, got in_channels={in_channels}')
        self.in_channels = list(in_channels)
        self.num_classes = num_classes
        self.channels = channels
        self.psp_modules = PPM(pool_scales, self.in_channels[-1], channels)
        self.bottleneck = ConvModule(self.in_channels[-1] + len(pool_scales) * channels,
                                     channels, 3, padding=1)
        self.lateral_convs = nn.ModuleList(
            ConvModule(c, channels, 1) for c in self.in_channels[:-1])
        self.fpn_convs = nn.ModuleList(
            ConvModule(channels, channels, 3, padding=1) for _ in self.in_channels[:-1])
        self.fpn_bottleneck = ConvModule(len(self.in_channels) * channels, channels, 3,
                                         padding=1)
        self.dropout = nn.Dropout2d(dropout_ratio) if dropout_ratio > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, 0.0, 0.01)  # mmseg's init of the classifier
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Map four (B, C_i, H/s_i, W/s_i) maps to (B, num_classes, H/4, W/4) logits."""
        x_top = features[-1]
        psp = torch.cat([x_top, *self.psp_modules(x_top)], dim=1)
        laterals = [conv(features[i]) for i, conv in enumerate(self.lateral_convs)]
        laterals.append(self.bottleneck(psp))
        for i in range(len(laterals) - 1, 0, -1):  # top-down path
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [self.fpn_convs[i](laterals[i]) for i in range(len(laterals) - 1)]
        outs.append(laterals[-1])
        if COARSE_FUSION and not self.training:
            fused = self._fuse_coarse(outs)
        else:
            size = outs[0].shape[-2:]
            fused = self.fpn_bottleneck(torch.cat([_resize(o, size) for o in outs], dim=1))
        return self.conv_seg(self.dropout(fused))

    def _fuse_coarse(self, outs: Sequence[torch.Tensor]) -> torch.Tensor:
        # fpn_bottleneck (conv -> bn -> relu) over cat(outs[0], resized outs[1:]), its conv
        # split by input level: level 0 as it is, each coarse level as nine 1x1 products at
        # its own resolution (one conv, tap-major output channels) that resize_tap_sum
        # resizes, shifts and adds, with the BatchNorm (folded) and the ReLU.
        block = self.fpn_bottleneck
        weight, width = block.conv.weight, self.channels
        acc = F.conv2d(outs[0], weight[:, :width], padding=1)
        taps = []
        for level in range(1, len(outs)):
            per_tap = weight[:, level * width:(level + 1) * width].permute(2, 3, 0, 1)
            taps.append(F.conv2d(outs[level], per_tap.reshape(9 * width, width, 1, 1)))
        bn = block.bn
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        shift = bn.bias - bn.running_mean * scale
        from mamba_perception_kernels import resize_tap_sum

        return resize_tap_sum(acc, taps, scale, shift, relu=True)


class FCNHead(nn.Module):
    """Auxiliary FCN head of the mmseg UperNet configs (one 3x3 ConvModule, then conv_seg).

    Used only as a training aid (loss weight 0.4 on stage ``in_index``); never at inference.
    """

    def __init__(self, in_channels: int, num_classes: int = 150, channels: int = 256,
                 in_index: int = 2, dropout_ratio: float = 0.1) -> None:
        super().__init__()
        self.in_index = in_index
        self.convs = nn.Sequential(ConvModule(in_channels, channels, 3, padding=1))
        self.dropout = nn.Dropout2d(dropout_ratio) if dropout_ratio > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, 0.0, 0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Return logits at the stride of ``features[in_index]``."""
        return self.conv_seg(self.dropout(self.convs(features[self.in_index])))
