"""Helpers for the replay tests: small bags of real vtest.avi frames with ground truth.

Ground truth is written by the test (boxes and class masks drawn from a seeded generator):
vtest.avi comes without annotations. Predictions come from :class:`Oracle`, which looks a frame
up by its bytes and returns its ground truth, exactly (perfect) or perturbed (jitter), so the
evaluation is tested without the model; one test runs the real Pipeline end to end.
"""

import hashlib

import numpy as np

from mamba_perception.replay import sample
from mamba_perception.replay.bag import (
    DETECTIONS_TYPE,
    IMAGE_TYPE,
    BagWriter,
    detections_msg,
    image_msg,
)
from mamba_perception.results import Detections, FrameResult, StageTimes

CLASSES = ['person', 'car', 'van']
CAMERA = '/camera/image_raw'
GT_DETS = '/camera/gt/detections'
GT_MASK = '/camera/gt/mask'
N_FRAMES = 5
SCALE = 0.25  # 768x576 -> 192x144


def make_truth(frames, seed=0):
    """Per frame: boxes (n, 4) xyxy, class ids (n,), class mask with a 255 border."""
    rng = np.random.default_rng(seed)
    out = []
    for _number, rgb in frames:
        h, w = rgb.shape[:2]
        n = int(rng.integers(2, 5))
        x1 = rng.uniform(0, w * 0.6, n)
        y1 = rng.uniform(0, h * 0.6, n)
        bw = rng.uniform(12, w * 0.35, n)
        bh = rng.uniform(12, h * 0.35, n)
        boxes = np.stack([x1, y1, np.minimum(x1 + bw, w), np.minimum(y1 + bh, h)], 1)
        ids = rng.integers(0, len(CLASSES), n)
        mask = np.zeros((h, w), np.uint8)
        for b, c in zip(boxes, ids, strict=True):
            mask[int(b[1]):int(b[3]), int(b[0]):int(b[2])] = c
        mask[:2] = 255  # ignored rows
        out.append({'boxes': boxes, 'class_ids': ids, 'mask': mask})
    return out


def write_bag(path, frames, truth, storage='mcap', with_dets=True, with_mask=True,
              class_as_name=True):
    """A rosbag2 with the frames (rgb8 Image), Detection2DArray and mono8 mask ground truth."""
    with BagWriter(path, storage) as w:
        for (number, rgb), t in zip(frames, truth, strict=True):
            stamp = sample.frame_stamp_ns(number)
            w.write(CAMERA, IMAGE_TYPE, image_msg(w.store, rgb, stamp, 'cam', 'rgb8'), stamp)
            if with_dets:
                names = [CLASSES[c] if class_as_name else str(c) for c in t['class_ids']]
                w.write(GT_DETS, DETECTIONS_TYPE,
                        detections_msg(w.store, stamp, t['boxes'], names, frame_id='cam'),
                        stamp + 1000)
            if with_mask:
                w.write(GT_MASK, IMAGE_TYPE, image_msg(w.store, t['mask'], stamp, 'cam', 'mono8'),
                        stamp + 2000)
    return path


def frame_key(rgb):
    return hashlib.sha1(np.ascontiguousarray(rgb).tobytes()).hexdigest()


def jitter_predictions(truth, seed=1):
    """Deterministic imperfect predictions: shifted boxes, random scores, one false positive."""
    rng = np.random.default_rng(seed)
    out = []
    for t in truth:
        boxes = t['boxes'] + rng.normal(0, 4, t['boxes'].shape)
        ids = t['class_ids'].copy()
        scores = rng.uniform(0.3, 1.0, len(ids))
        boxes = np.vstack([boxes, [[5, 5, 40, 40]]])
        ids = np.append(ids, 0)
        scores = np.append(scores, 0.9)
        mask = t['mask'].copy()
        mask[mask == 255] = 0
        mask[-10:] = 1  # some wrong pixels
        out.append({'boxes': boxes, 'class_ids': ids, 'scores': scores, 'mask': mask})
    return out


class Oracle:
    """A picklable predictor returning prepared predictions for known frames."""

    class_names = CLASSES
    class_colors = np.asarray([[255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
    tasks = ('detection', 'segmentation')
    bundle_hash = 'sha256:oracle'
    device = 'cpu'
    precision = 'fp32'

    def __init__(self, frames, predictions, interrupt_after=None):
        self.table = {frame_key(rgb): p for (_n, rgb), p in zip(frames, predictions, strict=True)}
        self.calls = 0
        self.interrupt_after = interrupt_after

    def __call__(self, rgb):
        if self.interrupt_after is not None and self.calls >= self.interrupt_after:
            raise KeyboardInterrupt
        self.calls += 1
        p = self.table[frame_key(rgb)]
        scores = p.get('scores', np.ones(len(p['class_ids'])))
        dets = Detections(np.asarray(p['boxes'], np.float32), np.asarray(scores, np.float32),
                          np.asarray(p['class_ids'], np.int64))
        mask = p['mask'].copy()
        mask[mask == 255] = 0
        return FrameResult(rgb.shape[0], rgb.shape[1], dets, mask,
                           StageTimes(preprocess_ms=1.0, inference_ms=5.0 + self.calls,
                                      postprocess_ms=0.5))


class OracleFactory:
    """Picklable ``predictor_factory`` for run_replay (workers build their own oracle)."""

    def __init__(self, frames, predictions):
        self.frames, self.predictions = frames, predictions

    def __call__(self, device='cpu'):
        return Oracle(self.frames, self.predictions)
