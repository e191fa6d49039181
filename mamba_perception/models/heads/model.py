"""A backbone with a detection head, a segmentation head, or both, run in one forward.

The model is described by a plain config dict (stored in the bundle metadata)::

    {'backbone': {'name': 'vmamba_tiny', 'kwargs': {...}},
     'detection': {'num_classes': 80, ...} or None,       # MaskRCNNHead kwargs
     'segmentation': {'num_classes': 150, ...} or None}   # UPerHead kwargs (+ 'auxiliary')

Inference is split into a dense part with fixed shapes for a fixed input size
(:meth:`PerceptionModel.forward_dense`: backbone, FPN, RPN head and its proposals up to NMS,
UperNet; safe to compile and to capture in a CUDA graph) and a sparse part with data-dependent
shapes (:meth:`PerceptionModel.detect`: the proposals' clip to each image and NMS, RoI heads).
"""

from typing import Any, Optional

import torch
from torch import nn

from .detection import MaskRCNNHead
from .segmentation import FCNHead, UPerHead

TASKS = ('detection', 'segmentation')


def _create_backbone(name: str, kwargs: dict) -> nn.Module:
    # Imported here so that building heads alone does not need the backbone registry.
    from mamba_perception.models import create_model
    return create_model(name, **kwargs)


class PerceptionModel(nn.Module):
    """Backbone + optional :class:`MaskRCNNHead` (``detector``) + optional UperNet.

    Without heads it is a backbone-only model (converted ImageNet weights, the starting point
    of fine-tuning).

    Parameter names: ``backbone.*``, ``detector.*`` (torchvision layout), ``decode_head.*`` and
    ``auxiliary_head.*`` (mmseg layout).
    """

    def __init__(self, backbone: nn.Module, detection: Optional[dict] = None,
                 segmentation: Optional[dict] = None) -> None:
        super().__init__()
        self.backbone = backbone
        channels = [int(info['num_chs']) for info in backbone.feature_info]
        reductions = [int(info['reduction']) for info in backbone.feature_info]
        if reductions != [4, 8, 16, 32]:
            raise ValueError(f'heads need backbone maps at strides 4/8/16/32, got {reductions}')
        self.detector = MaskRCNNHead(channels, **detection) if detection is not None else None
        self.decode_head = self.auxiliary_head = None
        if segmentation is not None:
            seg = dict(segmentation)
            aux = seg.pop('auxiliary', False)
            self.decode_head = UPerHead(channels, **seg)
            if aux:
                self.auxiliary_head = FCNHead(channels[2], seg.get('num_classes', 150))

    @property
    def tasks(self) -> tuple[str, ...]:
        """The subset of ('detection', 'segmentation') this model computes."""
        return tuple(t for t, head in zip(TASKS, (self.detector, self.decode_head), strict=True)
                     if head is not None)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Four NCHW backbone maps at strides 4/8/16/32."""
        return list(self.backbone.forward_intermediates(x))

    def forward_dense(self, x: torch.Tensor) -> dict[str, Any]:
        """Fixed-shape outputs for a normalised, padded batch x (B, 3, H, W), H and W % 32 == 0.

        Keys: ``seg_logits`` (B, K, H/4, W/4); for detection those of
        :meth:`MaskRCNNHead.dense`: ``pyramid`` (P2..P6), the RPN's proposals before NMS
        ``rpn_boxes`` (B, N, 4) and ``rpn_scores`` (B, N), and the per-image finiteness flags
        ``rpn_objectness_finite`` and ``rpn_deltas_finite`` (B,).
        """
        feats = self.features(x)
        out: dict[str, Any] = {}
        if self.detector is not None:
            out.update(self.detector.dense(feats))
        if self.decode_head is not None:
            out['seg_logits'] = self.decode_head(feats)
        return out

    def detect(self, dense: dict[str, Any], image_sizes: list[tuple[int, int]]
               ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per-image (boxes, scores, class_ids) candidates before threshold and NMS."""
        if self.detector is None:
            raise ValueError('this model has no detection head')
        proposals = self.detector.proposals(dense['pyramid'], dense['rpn_boxes'],
                                            dense['rpn_scores'], image_sizes)
        return self.detector.candidates(dense['pyramid'], proposals, image_sizes)


def build_perception_model(config: dict, device: Optional[str] = None) -> PerceptionModel:
    """Build a :class:`PerceptionModel` from the plain config dict described above.

    ``device='meta'`` builds a weightless model for key/shape checks (the backbone is built on
    the CPU first, as its constructor reads values from tensors, then moved).
    """
    backbone_cfg = config.get('backbone') or {}
    if 'name' not in backbone_cfg:
        raise ValueError(f"model config needs backbone.name, got {backbone_cfg!r}")
    backbone = _create_backbone(backbone_cfg['name'], dict(backbone_cfg.get('kwargs') or {}))
    if device is None:
        return PerceptionModel(backbone, config.get('detection'), config.get('segmentation'))
    backbone = backbone.to(device)
    with torch.device(device):
        return PerceptionModel(backbone, config.get('detection'), config.get('segmentation'))
