"""Streaming accumulators for replay evaluation: COCO detection AP, mIoU, latency, drops.

Each accumulator takes one frame at a time (``add``), can be merged with another of the same
kind (``merge``: results of several bags or workers add up: COCO matches are recomputed over
the union of all images and confusion matrices are summed, so the merged mAP is never an average
of per-bag mAPs), and summarises itself as a plain dict (``summary``) whose keys carry units.
NaN means "not defined" (a class without ground truth has no AP); the report writes it as null.

COCO AP comes from ``faster-coco-eval`` (or ``pycocotools`` if that is what is installed) run on
COCO dicts built here, so that the numbers are exactly the reference implementation's.
"""

from __future__ import annotations

from collections.abc import Sequence
import contextlib
import io
import math
from typing import Any, Optional

import numpy as np

from mamba_perception.errors import InputError, SetupError
from mamba_perception.results import STAGES, Detections, StageTimes

IGNORE_INDEX = 255
PERCENTILES = (50, 90, 99)


def _coco_backend(name: str = 'auto') -> tuple[str, Any, Any]:
    """(backend name, COCO class, COCOeval class) for 'faster_coco_eval' / 'pycocotools'."""
    order = ['faster_coco_eval', 'pycocotools'] if name == 'auto' else [name]
    for backend in order:
        try:
            if backend == 'faster_coco_eval':
                from faster_coco_eval import COCO, COCOeval_faster
                return backend, COCO, COCOeval_faster
            if backend == 'pycocotools':
                from pycocotools.coco import COCO
                from pycocotools.cocoeval import COCOeval
                return backend, COCO, COCOeval
        except ImportError:
            continue
    raise SetupError(f'COCO evaluation needs faster-coco-eval or pycocotools ({name!r} asked '
                     'for); pip install faster-coco-eval')


def _nan_to_none(x: float) -> Optional[float]:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


# --------------------------------------------------------------------------------------------
# Detection

class DetectionAccumulator:
    """Ground-truth boxes and predictions of many frames, evaluated with COCO's AP at the end.

    Args:
        class_names: the model's classes; class id ``k`` is COCO category ``k + 1``.
    """

    def __init__(self, class_names: Sequence[str]) -> None:
        self.class_names = list(class_names)
        self.images: list[dict] = []
        self.gt: list[dict] = []  # per image: boxes (n, 4) xyxy, class ids (n,)
        self.pred: list[dict] = []  # per image: boxes, scores, class ids

    def __len__(self) -> int:
        return len(self.images)

    def add(self, height_px: int, width_px: int, gt_boxes_xyxy_px: np.ndarray,
            gt_class_ids: np.ndarray, detections: Optional[Detections], key: str = '') -> None:
        """One frame: its ground truth and the model's detections (None counts as no boxes)."""
        dets = detections if detections is not None else Detections.empty()
        self.images.append({'height': int(height_px), 'width': int(width_px), 'key': key})
        self.gt.append({'boxes': np.asarray(gt_boxes_xyxy_px, np.float64).reshape(-1, 4),
                        'class_ids': np.asarray(gt_class_ids, np.int64).reshape(-1)})
        self.pred.append({'boxes': np.asarray(dets.boxes_xyxy_px, np.float64).reshape(-1, 4),
                          'scores': np.asarray(dets.scores, np.float64).reshape(-1),
                          'class_ids': np.asarray(dets.class_ids, np.int64).reshape(-1)})

    def merge(self, other: DetectionAccumulator) -> None:
        """Append another accumulator's frames (same classes)."""
        if other.class_names != self.class_names:
            raise InputError('cannot merge detection results of different class lists: '
                             f'{self.class_names} vs {other.class_names}')
        self.images += other.images
        self.gt += other.gt
        self.pred += other.pred

    def to_coco(self) -> tuple[dict, list[dict]]:
        """(ground-truth COCO dataset dict, list of COCO result dicts); ids start at 1."""
        cats = [{'id': i + 1, 'name': n} for i, n in enumerate(self.class_names)]
        images, annotations, results = [], [], []
        for image_id, (img, gt, pred) in enumerate(zip(self.images, self.gt, self.pred,
                                                       strict=True), start=1):
            images.append({'id': image_id, 'height': img['height'], 'width': img['width'],
                           'file_name': img['key'] or str(image_id)})
            for box, cid in zip(gt['boxes'], gt['class_ids'], strict=True):
                w, h = float(box[2] - box[0]), float(box[3] - box[1])
                annotations.append({'id': len(annotations) + 1, 'image_id': image_id,
                                    'category_id': int(cid) + 1, 'iscrowd': 0, 'area': w * h,
                                    'bbox': [float(box[0]), float(box[1]), w, h]})
            for box, score, cid in zip(pred['boxes'], pred['scores'], pred['class_ids'],
                                       strict=True):
                results.append({'image_id': image_id, 'category_id': int(cid) + 1,
                                'score': float(score),
                                'bbox': [float(box[0]), float(box[1]), float(box[2] - box[0]),
                                         float(box[3] - box[1])]})
        return {'images': images, 'annotations': annotations, 'categories': cats}, results

    def summary(self, backend: str = 'auto') -> dict:
        """Summarise: counts, then COCO mAP / AP50 / AP75 / AP by size and per-class AP."""
        gt_count = np.bincount(np.concatenate([g['class_ids'] for g in self.gt] or [[]])
                               .astype(np.int64), minlength=len(self.class_names))
        pred_count = np.bincount(np.concatenate([p['class_ids'] for p in self.pred] or [[]])
                                 .astype(np.int64), minlength=len(self.class_names))
        out: dict = {'frames': len(self.images), 'gt_boxes': int(gt_count.sum()),
                     'predicted_boxes': int(pred_count.sum()), 'backend': None,
                     'mAP': None, 'AP50': None, 'AP75': None, 'AP_small': None,
                     'AP_medium': None, 'AP_large': None, 'AR100': None, 'per_class': {}}
        for k, name in enumerate(self.class_names):
            out['per_class'][name] = {'gt_boxes': int(gt_count[k]),
                                      'predicted_boxes': int(pred_count[k]), 'AP': None,
                                      'AP50': None}
        if not self.images or gt_count.sum() == 0:
            out['note'] = 'no ground-truth boxes: detection AP is not defined'
            return out
        name, coco_t, eval_t = _coco_backend(backend)
        out['backend'] = name
        gt_dict, results = self.to_coco()
        if not results:  # loadRes refuses an empty list; every class with GT has AP 0
            out.update({k: 0.0 for k in ('mAP', 'AP50', 'AP75', 'AR100')})
            for k, cname in enumerate(self.class_names):
                if gt_count[k]:
                    out['per_class'][cname].update(AP=0.0, AP50=0.0)
            return out
        stats, precision = run_coco_eval(gt_dict, results, name, coco_t, eval_t)
        keys = ('mAP', 'AP50', 'AP75', 'AP_small', 'AP_medium', 'AP_large')
        for i, key in enumerate(keys):
            out[key] = None if stats[i] < 0 else float(stats[i])
        out['AR100'] = None if stats[8] < 0 else float(stats[8])
        for k, cname in enumerate(self.class_names):
            p = precision[:, :, k, 0, -1]  # IoU thresholds x recall, area all, maxDets 100
            valid = p[p > -1]
            p50 = precision[0, :, k, 0, -1]
            out['per_class'][cname]['AP'] = float(valid.mean()) if valid.size else None
            out['per_class'][cname]['AP50'] = (float(p50[p50 > -1].mean())
                                               if (p50 > -1).any() else None)
        return out


def run_coco_eval(gt_dict: dict, results: list[dict], name: str, coco_t: Any, eval_t: Any
                  ) -> tuple[np.ndarray, np.ndarray]:
    """COCO bbox evaluation; returns (the 12 summary stats, the precision array)."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = coco_t(gt_dict) if name == 'faster_coco_eval' else _pycoco(coco_t, gt_dict)
        dt = gt.loadRes(results)
        ev = eval_t(gt, dt, 'bbox')
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return np.asarray(ev.stats, np.float64), np.asarray(ev.eval['precision'])


def _pycoco(coco_t: Any, gt_dict: dict) -> Any:
    coco = coco_t()
    coco.dataset = gt_dict
    coco.createIndex()
    return coco


# --------------------------------------------------------------------------------------------
# Segmentation

class ConfusionMatrix:
    """Pixel confusion matrix ``matrix[gt, pred]`` over ``num_classes`` classes.

    Ground-truth pixels equal to ``ignore_index`` (or outside ``[0, num_classes)``, which are
    counted in ``invalid_gt_pixels``) take no part.
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.matrix = np.zeros((self.num_classes, self.num_classes), np.int64)
        self.frames = 0
        self.ignored_pixels = 0
        self.invalid_gt_pixels = 0

    def add(self, gt_mask: np.ndarray, pred_mask: np.ndarray, key: str = '') -> None:
        """One frame: (H, W) ground-truth class ids and predicted class ids."""
        gt = np.asarray(gt_mask).astype(np.int64, copy=False)
        pred = np.asarray(pred_mask).astype(np.int64, copy=False)
        if gt.shape != pred.shape:
            raise InputError(f'{key or "frame"}: ground-truth mask {gt.shape} and predicted '
                             f'mask {pred.shape} differ in size')
        if pred.size and (pred.min() < 0 or pred.max() >= self.num_classes):
            raise InputError(f'{key or "frame"}: predicted class id {int(pred.max())} is not in '
                             f'[0, {self.num_classes})')
        ignored = gt == self.ignore_index
        invalid = ~ignored & ((gt < 0) | (gt >= self.num_classes))
        valid = ~(ignored | invalid)
        self.ignored_pixels += int(ignored.sum())
        self.invalid_gt_pixels += int(invalid.sum())
        idx = gt[valid] * self.num_classes + pred[valid]
        self.matrix += np.bincount(idx, minlength=self.num_classes ** 2).reshape(
            self.num_classes, self.num_classes)
        self.frames += 1

    def merge(self, other: ConfusionMatrix) -> None:
        """Add another matrix of the same classes."""
        if other.num_classes != self.num_classes:
            raise InputError(f'cannot merge confusion matrices of {self.num_classes} and '
                             f'{other.num_classes} classes')
        self.matrix += other.matrix
        self.frames += other.frames
        self.ignored_pixels += other.ignored_pixels
        self.invalid_gt_pixels += other.invalid_gt_pixels

    def iou(self) -> np.ndarray:
        """Per-class IoU = TP / (TP + FP + FN); NaN where the class is in neither."""
        tp = np.diag(self.matrix).astype(np.float64)
        union = self.matrix.sum(0) + self.matrix.sum(1) - tp
        with np.errstate(invalid='ignore', divide='ignore'):
            return np.where(union > 0, tp / np.maximum(union, 1), np.nan)

    def summary(self, class_names: Sequence[str]) -> dict:
        """Summarise: counts, then mIoU (mean of defined IoUs), pixel accuracy, per class."""
        iou = self.iou()
        total = int(self.matrix.sum())
        defined = iou[~np.isnan(iou)]
        return {
            'frames': self.frames, 'evaluated_pixels': total,
            'ignored_pixels': self.ignored_pixels, 'invalid_gt_pixels': self.invalid_gt_pixels,
            'ignore_index': self.ignore_index,
            'mIoU': float(defined.mean()) if defined.size else None,
            'pixel_accuracy': float(np.trace(self.matrix) / total) if total else None,
            'per_class': {name: {'gt_pixels': int(self.matrix[k].sum()),
                                 'predicted_pixels': int(self.matrix[:, k].sum()),
                                 'IoU': _nan_to_none(float(iou[k]))}
                          for k, name in enumerate(class_names)},
            'confusion_matrix': self.matrix.tolist(),
        }


# --------------------------------------------------------------------------------------------
# Latency and real-time behaviour

class LatencyAccumulator:
    """Per-stage milliseconds of every frame; percentiles over all of them at the end."""

    KEYS = tuple(f'{s}_ms' for s in STAGES) + ('total_ms',)

    def __init__(self) -> None:
        self.samples: dict[str, list[float]] = {k: [] for k in self.KEYS}

    def add(self, times: StageTimes) -> None:
        """Add one frame's stage times."""
        for key, value in times.as_dict().items():
            self.samples[key].append(float(value))

    def merge(self, other: LatencyAccumulator) -> None:
        """Append another accumulator's samples."""
        for key in self.KEYS:
            self.samples[key] += other.samples[key]

    def summary(self) -> dict:
        """``{stage_ms: {count, mean_ms, p50_ms, p90_ms, p99_ms, max_ms}}``."""
        return {key: latency_stats(values) for key, values in self.samples.items()}


def latency_stats(values_ms: Sequence[float]) -> dict:
    """Count, mean, p50 / p90 / p99 (linear interpolation) and max of millisecond samples."""
    v = np.asarray(values_ms, np.float64)
    out: dict = {'count': int(v.size)}
    if not v.size:
        out.update({'mean_ms': None, **{f'p{p}_ms': None for p in PERCENTILES}, 'max_ms': None})
        return out
    out['mean_ms'] = float(v.mean())
    for p in PERCENTILES:
        out[f'p{p}_ms'] = float(np.percentile(v, p))
    out['max_ms'] = float(v.max())
    return out


def simulate_one_slot_drops(arrival_ns: Sequence[int], service_ms: Sequence[float]) -> dict:
    """Frames a one-slot latest-frame buffer would drop, had frames arrived as recorded.

    The node keeps one pending frame per camera and one inference worker: a frame that arrives
    while the worker is busy replaces the pending one, which is then dropped. Here each frame
    takes the time measured for it offline (``service_ms``) on this machine.
    """
    order = np.argsort(np.asarray(arrival_ns, np.int64), kind='stable')
    arrivals = np.asarray(arrival_ns, np.int64)[order]
    service = np.asarray(service_ms, np.float64)[order] * 1e6
    busy_until = -math.inf
    pending: Optional[int] = None
    dropped = 0
    for i, t in enumerate(arrivals):
        # drain: the worker takes the pending frame as soon as it is free
        while pending is not None and busy_until <= t:
            busy_until = max(busy_until, arrivals[pending]) + service[pending]
            pending = None
        if busy_until <= t:
            busy_until = t + service[i]
        else:
            if pending is not None:
                dropped += 1
            pending = i
    frames = int(arrivals.size)
    return {'frames': frames, 'dropped_frames': dropped,
            'drop_rate': dropped / frames if frames else None}


__all__ = ['IGNORE_INDEX', 'ConfusionMatrix', 'DetectionAccumulator', 'LatencyAccumulator',
           'latency_stats', 'run_coco_eval', 'simulate_one_slot_drops']
