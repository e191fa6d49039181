"""Result types shared by the pipeline, the ROS node and replay evaluation.

Plain dataclasses over numpy arrays: no torch, no ROS. Units are in the names (``_px`` for
source-image pixels, ``_ms`` for milliseconds, ``_ns`` for integer nanoseconds).
"""

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

STAGES = ('decode', 'preprocess', 'inference', 'postprocess')


@dataclass
class Detections:
    """Boxes of one frame after score threshold and per-class NMS, in source-image pixels."""

    boxes_xyxy_px: np.ndarray  # (n, 4) float32: x1, y1, x2, y2
    scores: np.ndarray  # (n,) float32 in [0, 1]
    class_ids: np.ndarray  # (n,) int64, indices into the bundle's class names

    @classmethod
    def empty(cls) -> 'Detections':
        """Return a result with no boxes."""
        return cls(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32),
                   np.zeros((0,), np.int64))

    def __len__(self) -> int:
        return int(self.scores.shape[0])


@dataclass
class StageTimes:
    """Wall time of each pipeline stage for one frame (CUDA events on GPU, perf_counter on CPU).

    For a batch, each frame carries the batch's times (the stages run once for all frames).
    """

    decode_ms: float = 0.0
    preprocess_ms: float = 0.0
    inference_ms: float = 0.0
    postprocess_ms: float = 0.0

    @property
    def total_ms(self) -> float:
        """Sum of the stage times."""
        return self.decode_ms + self.preprocess_ms + self.inference_ms + self.postprocess_ms

    def as_dict(self) -> dict:
        """Stage times keyed ``<stage>_ms``, plus ``total_ms``."""
        out = {f'{stage}_ms': getattr(self, f'{stage}_ms') for stage in STAGES}
        out['total_ms'] = self.total_ms
        return out


@dataclass
class FrameResult:
    """Everything the pipeline says about one frame."""

    height_px: int
    width_px: int
    detections: Optional[Detections] = None  # None when the model has no detection head
    class_mask: Optional[np.ndarray] = None  # (height_px, width_px) uint8 class ids, or None
    times: StageTimes = field(default_factory=StageTimes)
