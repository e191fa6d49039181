"""FPN + Mask R-CNN detection head assembled from torchvision's detection components.

Paper: He et al., "Mask R-CNN", ICCV 2017, https://arxiv.org/abs/1703.06870; FPN: Lin et al.,
https://arxiv.org/abs/1612.03144. The configuration is mmdetection's ``mask-rcnn_r50_fpn``
(https://github.com/open-mmlab/mmdetection, ``configs/_base_/models/mask-rcnn_r50_fpn.py``) that
VMamba's COCO configs inherit through the Swin Mask R-CNN config. The parts are torchvision's
(``FeaturePyramidNetwork``, ``AnchorGenerator``, ``RPNHead``, ``RegionProposalNetwork``,
``RoIHeads``, ``TwoMLPHead``, ``FastRCNNPredictor``, ``MaskRCNNHeads``, ``MaskRCNNPredictor``,
``roi_align``, ``batched_nms``); nothing here re-implements NMS or RoIAlign. For inference,
the anchors of each level's top-n boxes and the box decoding are computed here, with
torchvision's arithmetic (tested bit for bit), so that the RPN up to NMS runs in the dense part
(compiled, CUDA-graph captured) and the decoding makes no host-to-device copies.

Numerical conventions bridged so that mmdet checkpoints give mmdet's numbers
(``mamba_perception.models.convert`` maps the keys):

* **Anchors.** mmdet ``AnchorGenerator(strides=[4, 8, 16, 32, 64], ratios=[0.5, 1, 2],
  scales=[8], center_offset=0)``: sizes 32..512, centred on ``stride * i``, ratio-major order,
  ``h = sqrt(r)``, ``w = 1 / sqrt(r)`` like torchvision. Two differences are bridged in
  :class:`MMDetAnchorGenerator`: torchvision rounds the base anchors to whole pixels (mmdet >= 2.0
  does not), and torchvision infers each level's stride as ``padded_size // feature_size``,
  which gives 61 instead of 64 for the max-pooled P6 level when ``H / 32`` is odd; we keep the
  fixed strides.
* **Box coder.** mmdet ``DeltaXYWHBBoxCoder`` (``target_stds`` 1,1,1,1 for the RPN and
  0.1,0.1,0.2,0.2 for the box head, ``w = x2 - x1`` without +1, ``dw/dh`` clamped at
  ``|log(16/1000)|``) equals torchvision's ``BoxCoder`` with weights (1,1,1,1) and
  (10,10,5,5); no conversion needed.
* **RoIAlign.** mmdet uses ``RoIAlign(aligned=True, sampling_ratio=0)`` (half-pixel offset,
  adaptive sampling); torchvision's ``MultiScaleRoIAlign`` hard-codes ``aligned=False``.
  :class:`AlignedMultiScaleRoIAlign` calls ``torchvision.ops.roi_align(aligned=True)``.
  Level assignment is identical: mmdet ``floor(log2(sqrt(area) / 56))`` clamped to 0..3,
  torchvision ``floor(4 + log2(sqrt(area) / 224))`` clamped to 2..5 (the epsilon sits inside
  the log in mmdet and outside in torchvision: boxes exactly on a level boundary may differ).
* **Class order.** mmdet's ``fc_cls`` has 81 rows with background **last**; ``fc_reg`` has
  80 * 4 rows (no background); ``conv_logits`` has 80 rows. torchvision puts background
  **first** in all three (81, 81 * 4, 81). The converter rotates ``fc_cls`` and prepends zero
  rows to the other two. Class ids that leave this module are 0-based without background.
* **Mask pasting.** mmdet pastes 28x28 masks with ``grid_sample``; torchvision's
  ``paste_masks_in_image`` expands the box by one pixel and uses ``interpolate``: masks may
  differ by about one pixel at the edges.
* **Test settings.** RPN 1000 pre-NMS per level, NMS 0.7, 1000 kept; box head score 0.05,
  per-class NMS 0.5, 100 kept (the pipeline applies its own thresholds instead).
"""

from collections import OrderedDict
from typing import Any, Optional, Sequence

import torch
from torch import nn
import torch.nn.functional as F
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads, maskrcnn_inference
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.ops import (
    FeaturePyramidNetwork,
    MultiScaleRoIAlign,
    roi_align,
)
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.poolers import _convert_to_roi_format, _setup_scales

from .nms_streams import nms_each

FEATURE_NAMES = ('0', '1', '2', '3')  # FPN levels P2..P5; torchvision adds 'pool' (P6)
ANCHOR_STRIDES = (4, 8, 16, 32, 64)
ANCHOR_SIZES = (32, 64, 128, 256, 512)  # mmdet: octave scale 8 x stride
ANCHOR_RATIOS = (0.5, 1.0, 2.0)


class MMDetAnchorGenerator(AnchorGenerator):
    """torchvision's anchor generator with mmdet's unrounded base anchors and fixed strides."""

    def __init__(self, sizes: Sequence[int] = ANCHOR_SIZES,
                 aspect_ratios: Sequence[float] = ANCHOR_RATIOS,
                 strides: Sequence[int] = ANCHOR_STRIDES) -> None:
        super().__init__(tuple((s,) for s in sizes), (tuple(aspect_ratios),) * len(sizes))
        self.strides = tuple(strides)
        # torchvision's generate_anchors rounds to whole pixels; mmdet >= 2.0 keeps fractions.
        self.cell_anchors = [self._unrounded(s, aspect_ratios) for s in sizes]
        # cell_anchors as one (L, A, 4) that moves with the model, for anchors_at (derived
        # from the arguments: not saved)
        self.register_buffer('base_anchors', torch.stack(self.cell_anchors), persistent=False)
        # (grid sizes, device) -> anchors, for torchvision's RPN forward (training): a fixed
        # size asks for the same anchors every step, and building them is ~90 small ops.
        # Bounded for multi-scale training. Inference takes only the anchors it needs.
        self._cache: dict = {}

    @staticmethod
    def _unrounded(size: int, aspect_ratios: Sequence[float]) -> torch.Tensor:
        ratios = torch.as_tensor(aspect_ratios, dtype=torch.float32)
        h_ratios = torch.sqrt(ratios)
        ws, hs = size / h_ratios, size * h_ratios
        return torch.stack([-ws, -hs, ws, hs], dim=1) / 2  # (A, 4), same order as torchvision

    def forward(self, image_list: ImageList,
                feature_maps: list[torch.Tensor]) -> list[torch.Tensor]:
        """Anchors (sum_l H_l * W_l * A, 4) per image, in padded-input pixels.

        The same tensor for every image, cached per grid: callers must not modify it.
        """
        grid_sizes = [f.shape[-2:] for f in feature_maps]
        # float32 even under autocast: fp16 has 1 px resolution above 1024 px
        dtype, device = torch.float32, feature_maps[0].device
        key = (tuple(tuple(g) for g in grid_sizes), device)
        anchors = self._cache.get(key)
        if anchors is None:
            strides = [[torch.tensor(s, dtype=torch.int64, device=device)] * 2
                       for s in self.strides[:len(grid_sizes)]]
            self.set_cell_anchors(dtype, device)
            anchors = torch.cat(self.grid_anchors(grid_sizes, strides))
            if len(self._cache) >= 8:
                self._cache.clear()
            self._cache[key] = anchors
        return [anchors for _ in image_list.image_sizes]

    def anchors_at(self, level: int, cell: torch.Tensor, anchor: torch.Tensor,
                   grid_width: int) -> torch.Tensor:
        """Anchors (..., 4) of one level at grid cells ``cell`` and base anchors ``anchor``.

        ``cell`` is ``y * grid_width + x``, ``anchor`` indexes the level's A base anchors. The
        result is bit for bit the anchor at ``cell * A + anchor`` of the level's part of
        :meth:`forward`, without building the grid: inference needs each level's top-n anchors
        (4720 of ~235k at 1280x736), and these are a few elementwise ops with no cache or host
        data, which ``torch.compile`` traces and a CUDA graph captures.
        """
        y, x = cell // grid_width, cell % grid_width
        # integer shifts plus float32 base anchors, as torchvision's grid_anchors adds them
        shifts = torch.stack([x, y, x, y], dim=-1) * self.strides[level]
        return shifts + self.base_anchors[level, anchor]


class AlignedMultiScaleRoIAlign(MultiScaleRoIAlign):
    """torchvision's multi-scale RoIAlign, but with ``aligned=True`` as mmdet's RoIAlign."""

    def forward(self, x: dict[str, torch.Tensor], boxes: list[torch.Tensor],
                image_shapes: list[tuple[int, int]]) -> torch.Tensor:
        """Pool (sum N_i, C, S, S) features for boxes given in padded-input pixels."""
        feats = [x[name] for name in self.featmap_names]
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(
                feats, image_shapes, self.canonical_scale, self.canonical_level)
        rois = _convert_to_roi_format(boxes)
        levels = self.map_levels(boxes)
        result = feats[0].new_zeros((rois.shape[0], feats[0].shape[1], *self.output_size))
        # boxes grouped by level with one host synchronisation (torchvision: one per level)
        order = levels.argsort(stable=True)
        counts = torch.bincount(levels, minlength=len(feats)).tolist()
        start = 0
        for feat, scale, n in zip(feats, self.scales, counts, strict=True):
            idx = order[start:start + n]
            start += n
            if not n:
                continue
            pooled = roi_align(feat, rois[idx], self.output_size, spatial_scale=scale,
                               sampling_ratio=self.sampling_ratio, aligned=True)
            result[idx] = pooled.to(result.dtype)
        return result


def _decode_boxes(deltas: torch.Tensor, anchors: torch.Tensor, box_coder) -> torch.Tensor:
    """Decode (..., 4) deltas at anchors as torchvision's ``BoxCoder.decode_single``, bit for bit.

    The same operations in the same order, x and y side by side (the coder's x and y weights
    are equal: the RPN's are 1, the box head's 10, 10, 5, 5), but without its two
    ``torch.tensor(0.5, device=...)``: each is a blocking host-to-device copy (a stream
    synchronisation on CUDA), which a CUDA-graph capture does not allow either.
    """
    wx, wy, ww, wh = box_coder.weights
    if wx != wy or ww != wh:
        raise ValueError(f'box coder weights {box_coder.weights}: x and y must be equal')
    anchors = anchors.to(deltas.dtype)
    sizes = anchors[..., 2:] - anchors[..., :2]
    centres = anchors[..., :2] + 0.5 * sizes
    d_centres = deltas[..., :2] / wx
    d_sizes = (deltas[..., 2:] / ww).clamp(max=box_coder.bbox_xform_clip)
    pred_centres = d_centres * sizes + centres
    half_sizes = 0.5 * (torch.exp(d_sizes) * sizes)
    return torch.cat([pred_centres - half_sizes, pred_centres + half_sizes], dim=-1)


def _all_finite(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """(B,) bool: all values of image b in all the (B, C, H, W) maps are finite."""
    return torch.stack([torch.isfinite(m).all(dim=(1, 2, 3)) for m in maps]).all(0)


def _image_bounds(image_sizes: Sequence[tuple[int, int]], device: torch.device,
                  repeats: Optional[Sequence[int]] = None) -> torch.Tensor:
    """(B, 1, 4) float32 (width, height, width, height) per image, to clamp xyxy boxes with.

    With ``repeats``, each image's row ``repeats[i]`` times. Built on the host and copied from
    pinned memory without blocking: a plain host-to-device copy waits for the stream.
    """
    bounds = torch.tensor([[w, h, w, h] for h, w in image_sizes], dtype=torch.float32)
    if repeats is not None:
        bounds = bounds.repeat_interleave(torch.tensor(repeats, dtype=torch.int64), dim=0)
    if device.type == 'cuda':
        bounds = bounds.pin_memory()
    return bounds.to(device, non_blocking=True)[:, None]


class MaskRCNNHead(nn.Module):
    """FPN neck + RPN + box and mask RoI heads over four backbone maps (strides 4..32).

    Args:
        in_channels: channels of the four backbone maps, finest first.
        num_classes: foreground classes (80 for COCO); background is added internally.
        fpn_channels: FPN width (also of the RPN and RoI features).
        representation_size: width of the two shared fully connected box-head layers.
        mask_channels: width of the four mask-head convs and the mask upsampling.
        with_mask: build the mask branch (Mask R-CNN) or not (Faster R-CNN).
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int = 80,
                 fpn_channels: int = 256, representation_size: int = 1024,
                 mask_channels: int = 256, with_mask: bool = True,
                 rpn_pre_nms_top_n_train: int = 2000, rpn_post_nms_top_n_train: int = 1000,
                 rpn_pre_nms_top_n_test: int = 1000, rpn_post_nms_top_n_test: int = 1000,
                 box_batch_size_per_image: int = 512) -> None:
        super().__init__()
        if len(in_channels) != 4:
            raise ValueError(f'MaskRCNNHead needs 4 input levels, got in_channels={in_channels}')
        self.num_classes = num_classes
        self.with_mask = with_mask
        self.neck = FeaturePyramidNetwork(list(in_channels), fpn_channels,
                                          extra_blocks=LastLevelMaxPool())
        self.rpn = RegionProposalNetwork(
            MMDetAnchorGenerator(), RPNHead(fpn_channels, len(ANCHOR_RATIOS)),
            fg_iou_thresh=0.7, bg_iou_thresh=0.3, batch_size_per_image=256,
            positive_fraction=0.5,
            pre_nms_top_n=dict(training=rpn_pre_nms_top_n_train, testing=rpn_pre_nms_top_n_test),
            post_nms_top_n=dict(training=rpn_post_nms_top_n_train,
                                testing=rpn_post_nms_top_n_test),
            nms_thresh=0.7)
        resolution = 7
        self.roi_heads = RoIHeads(
            AlignedMultiScaleRoIAlign(list(FEATURE_NAMES), resolution, sampling_ratio=0),
            TwoMLPHead(fpn_channels * resolution ** 2, representation_size),
            FastRCNNPredictor(representation_size, num_classes + 1),
            fg_iou_thresh=0.5, bg_iou_thresh=0.5,
            batch_size_per_image=box_batch_size_per_image, positive_fraction=0.25,
            bbox_reg_weights=(10.0, 10.0, 5.0, 5.0),
            score_thresh=0.05, nms_thresh=0.5, detections_per_img=100,
            mask_roi_pool=(AlignedMultiScaleRoIAlign(list(FEATURE_NAMES), 14, sampling_ratio=0)
                           if with_mask else None),
            mask_head=(MaskRCNNHeads(fpn_channels, [mask_channels] * 4, 1)
                       if with_mask else None),
            mask_predictor=(MaskRCNNPredictor(mask_channels, mask_channels, num_classes + 1)
                            if with_mask else None))

    # -- dense part: fixed shapes for a fixed input size (CUDA-graph and compile friendly) --
    def dense(self, features: Sequence[torch.Tensor]) -> dict[str, Any]:
        """FPN maps and the RPN's outputs up to NMS, which depend only on the input shape.

        Keys: ``pyramid`` (P2..P6); ``rpn_boxes`` (B, N, 4) and ``rpn_scores`` (B, N), the
        proposals before NMS (:meth:`pre_nms_proposals`); ``rpn_objectness_finite`` and
        ``rpn_deltas_finite`` (B,) bool: each image's RPN head outputs are all finite (they are
        computed from every pyramid level, so NaN anywhere in the backbone or FPN shows there).
        """
        pyramid = list(self.neck(OrderedDict(zip(FEATURE_NAMES, features, strict=True))).values())
        objectness, deltas = self.rpn.head(pyramid)
        boxes, scores = self.pre_nms_proposals(objectness, deltas)
        return {'pyramid': pyramid, 'rpn_boxes': boxes, 'rpn_scores': scores,
                'rpn_objectness_finite': _all_finite(objectness),
                'rpn_deltas_finite': _all_finite(deltas)}

    def pre_nms_proposals(self, objectness: list[torch.Tensor], deltas: list[torch.Tensor]
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each level's ``pre_nms_top_n`` most object-like anchors, decoded (eval mode).

        Args:
            objectness: RPN head logits (B, A, H, W) per level.
            deltas: RPN head box deltas (B, 4A, H, W) per level.

        Returns:
            ``boxes`` (B, N, 4) float32 xyxy in padded-input pixels, not clipped, and their
            sigmoid ``scores`` (B, N) float32; level-major, each level by decreasing score;
            N = sum over levels of min(pre_nms_top_n, H * W * A). These are the boxes and
            scores torchvision's ``RegionProposalNetwork.filter_proposals`` has before it clips
            them to the image, computed from the top-n anchors only (torchvision decodes all
            ~235k anchors of a 1280x736 input and then keeps 4720).
        """
        num_images = objectness[0].shape[0]
        batch_idx = torch.arange(num_images, device=objectness[0].device)[:, None]
        top_logits, top_deltas, top_anchors = [], [], []
        for level, (obj, reg, top_n) in enumerate(zip(
                objectness, deltas, self._pre_nms_counts(objectness), strict=True)):
            _, num_anchors, height, width = obj.shape
            # anchors in torchvision's order (y, x, a), as concat_box_prediction_layers has them
            obj = obj.permute(0, 2, 3, 1).reshape(num_images, -1).float()
            logits, index = obj.topk(top_n)
            cell, anchor = index // num_anchors, index % num_anchors
            reg = reg.reshape(num_images, num_anchors, 4, height * width)
            top_logits.append(logits)
            top_deltas.append(reg[batch_idx, anchor, :, cell])  # (B, top_n, 4)
            top_anchors.append(self.rpn.anchor_generator.anchors_at(level, cell, anchor, width))
        # float32: fp16 has 1 px resolution above 1024 px
        boxes = _decode_boxes(torch.cat(top_deltas, 1).float(), torch.cat(top_anchors, 1),
                              self.rpn.box_coder)
        return boxes, torch.sigmoid(torch.cat(top_logits, 1))

    def _pre_nms_counts(self, maps: Sequence[torch.Tensor]) -> list[int]:
        """Boxes each level keeps before NMS: pre_nms_top_n, or all its anchors if fewer."""
        per_cell = self.rpn.anchor_generator.num_anchors_per_location()
        return [min(self.rpn.pre_nms_top_n(), m.shape[-2] * m.shape[-1] * a)
                for m, a in zip(maps, per_cell, strict=True)]

    def _pyramid_dict(self, pyramid: Sequence[torch.Tensor]) -> 'OrderedDict[str, torch.Tensor]':
        return OrderedDict(zip((*FEATURE_NAMES, 'pool'), pyramid, strict=True))

    # -- sparse part: data-dependent shapes, host-driven -------------------------------------
    def proposals(self, pyramid: Sequence[torch.Tensor], boxes: torch.Tensor,
                  scores: torch.Tensor, image_sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
        """RPN proposals per image, (N_i, 4) xyxy in padded-input pixels (eval mode).

        Args:
            pyramid: the FPN maps from :meth:`dense` (their grids give each level's run of
                boxes).
            boxes, scores: the proposals before NMS from :meth:`dense` (``rpn_boxes``,
                ``rpn_scores``).
            image_sizes: (height, width) of each image before padding; images of one padded
                shape may differ in size (and share one CUDA graph), so the clip to them is
                done here.

        The same boxes in the same order as torchvision's ``RegionProposalNetwork.
        filter_proposals`` (tested), computed with one host synchronisation instead of about
        seven per image:

        * The clip to each image and the small-box and score tests run for all images at once.
        * NMS "independently per level" runs as one ``torchvision.ops.nms`` per image and
          level instead of one ``batched_nms`` over all levels: torchvision's NMS kernel ends
          in a one-block pass that is quadratic in the box count (~4700 boxes at 1280x720 cost
          ~1.5 ms on an H100, five calls of <= 1000 boxes a fifth of that), and the calls run
          side by side on CUDA streams (:func:`.nms_streams.nms_each`).
        * Small boxes (and boxes under the score threshold) are not removed before NMS, which
          would size each level's slice on the host: they enter NMS with score -1, below every
          sigmoid score, so they come after every real box and cannot suppress one; they are
          dropped after NMS.
        """
        rpn = self.rpn
        num_images = boxes.shape[0]
        # clip_boxes_to_image, all images at once, each against its own size
        boxes = boxes.clamp(min=0).minimum(_image_bounds(image_sizes, boxes.device))
        widths, heights = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
        valid = (widths >= rpn.min_size) & (heights >= rpn.min_size)  # remove_small_boxes
        if rpn.score_thresh > 0:  # sigmoid scores are >= 0: nothing to do otherwise
            valid &= scores >= rpn.score_thresh  # >= as torchvision
        scores = torch.where(valid, scores, -1.0)
        slices, start = [], 0  # each level's run of top-n boxes, fixed by the input size
        for n in self._pre_nms_counts(pyramid):
            slices.append(slice(start, start + n))
            start += n
        keeps = nms_each([(boxes[i, s], scores[i, s]) for i in range(num_images)
                          for s in slices], rpn.nms_thresh)
        ranked, counts = [], []
        for i in range(num_images):
            levels = keeps[i * len(slices):(i + 1) * len(slices)]
            keep = torch.cat([k + s.start for k, s in zip(levels, slices, strict=True)])
            kept_scores = scores[i, keep]
            keep = keep[kept_scores.argsort(descending=True, stable=True)]
            ranked.append(keep[:rpn.post_nms_top_n()])
            counts.append((kept_scores >= 0).sum())
        counts = torch.stack(counts).tolist()  # the one synchronisation (the NMS calls aside)
        return [boxes[i, keep[:min(n, len(keep))]]
                for i, (keep, n) in enumerate(zip(ranked, counts, strict=True))]

    def candidates(self, pyramid: Sequence[torch.Tensor], proposals: list[torch.Tensor],
                   image_sizes: list[tuple[int, int]]
                   ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Class-specific boxes before score threshold and NMS, per image.

        Returns one ``(boxes (M, 4) xyxy padded-input px clipped to the image, scores (M,),
        class_ids (M,) int64 0-based)`` per image, M = proposals x classes.
        """
        heads = self.roi_heads
        feats = self._pyramid_dict(pyramid)
        box_features = heads.box_head(heads.box_roi_pool(feats, proposals, image_sizes))
        class_logits, box_regression = heads.box_predictor(box_features)
        # (sum N, K+1, 4), as heads.box_coder.decode(box_regression.float(), proposals)
        boxes = _decode_boxes(box_regression.float().unflatten(1, (-1, 4)),
                              torch.cat(proposals)[:, None], heads.box_coder)
        counts = [p.shape[0] for p in proposals]
        # background dropped, and clip_boxes_to_image of all images at once, each to its size
        bounds = _image_bounds(image_sizes, boxes.device, repeats=counts)
        boxes = boxes[:, 1:].clamp(min=0).minimum(bounds)
        scores = F.softmax(class_logits.float(), -1)[:, 1:]
        labels = torch.arange(self.num_classes, device=boxes.device).expand_as(scores)
        # flattened once for all images; each image's part is a view
        sizes = [n * self.num_classes for n in counts]
        return list(zip(boxes.reshape(-1, 4).split(sizes), scores.reshape(-1).split(sizes),
                        labels.reshape(-1).split(sizes), strict=True))

    def masks(self, pyramid: Sequence[torch.Tensor], boxes: list[torch.Tensor],
              class_ids: list[torch.Tensor],
              image_sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
        """Mask probabilities (N_i, 1, 28, 28) of the given boxes (padded-input px)."""
        if not self.with_mask:
            raise ValueError('this detection head was built with with_mask=False')
        heads = self.roi_heads
        feats = self._pyramid_dict(pyramid)
        mask_features = heads.mask_head(heads.mask_roi_pool(feats, boxes, image_sizes))
        logits = heads.mask_predictor(mask_features)
        return maskrcnn_inference(logits, [c + 1 for c in class_ids])

    def forward(self, features: Sequence[torch.Tensor], image_sizes: list[tuple[int, int]],
                targets: Optional[list[dict[str, torch.Tensor]]] = None
                ) -> dict[str, torch.Tensor]:
        """Training losses (torchvision names) for targets in padded-input pixels.

        Each target has ``boxes`` (n, 4) xyxy float, ``labels`` (n,) int64 **0-based** and, when
        the mask branch is trained, ``masks`` (n, H, W) uint8 at padded-input size. Without
        ``masks`` the mask branch is skipped (box-only data).
        """
        if targets is None:
            raise ValueError('MaskRCNNHead.forward computes training losses and needs targets; '
                             'use dense/proposals/candidates for inference')
        feats = self.neck(OrderedDict(zip(FEATURE_NAMES, features, strict=True)))
        images = ImageList(features[0], image_sizes)
        tv_targets = [{**t, 'labels': t['labels'] + 1} for t in targets]  # background = 0
        proposals, rpn_losses = self.rpn(images, feats, tv_targets)
        heads = self.roi_heads
        saved = (heads.mask_roi_pool, heads.mask_head, heads.mask_predictor)
        if not all('masks' in t for t in targets):
            heads.mask_roi_pool = heads.mask_head = heads.mask_predictor = None
        try:
            _, roi_losses = heads(feats, proposals, image_sizes, tv_targets)
        finally:
            heads.mask_roi_pool, heads.mask_head, heads.mask_predictor = saved
        return {**rpn_losses, **roi_losses}
