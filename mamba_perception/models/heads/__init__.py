"""Dense-prediction heads (Mask R-CNN, UperNet) and the backbone + heads model."""

from .detection import MaskRCNNHead
from .model import TASKS, PerceptionModel, build_perception_model
from .segmentation import FCNHead, UPerHead

__all__ = ['FCNHead', 'MaskRCNNHead', 'PerceptionModel', 'TASKS', 'UPerHead',
           'build_perception_model']
