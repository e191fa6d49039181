"""The replay loop: frames of a bag through a predictor, into streaming accumulators.

A *predictor* is anything with the :class:`Predictor` attributes that maps an uint8 RGB frame
to a :class:`~mamba_perception.results.FrameResult`: the real
:class:`~mamba_perception.pipeline.Pipeline`, or in tests an oracle that returns ground truth.

:class:`Evaluation` is the whole state of a run (picklable, mergeable); a report is rendered
from it at any moment, which is how an interrupted or failed bag still gets a partial report.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
import json
import logging
import os
from pathlib import Path
import time
from typing import Any, Optional, Protocol

import numpy as np

from mamba_perception.errors import BagError, MambaPerceptionError, ParameterError
from mamba_perception.replay.bag import (
    CAMERA_TYPES,
    COMPRESSED_TYPE,
    DETECTIONS_TYPE,
    IMAGE_TYPE,
    BagReader,
    BagWriter,
    bag_hash,
    decode_detections,
    decode_image,
    decode_mask,
    detections_msg,
    header_stamp_ns,
    image_msg,
)
from mamba_perception.replay.metrics import (
    ConfusionMatrix,
    DetectionAccumulator,
    LatencyAccumulator,
    simulate_one_slot_drops,
)
from mamba_perception.results import FrameResult

log = logging.getLogger(__name__)

OVERLAY_WIDTH_PX = 384


class Predictor(Protocol):
    """What the replay loop needs from a pipeline."""

    class_names: list
    class_colors: np.ndarray
    tasks: tuple
    bundle_hash: str

    def __call__(self, frame: np.ndarray) -> FrameResult:
        """Process one uint8 RGB (H, W, 3) frame."""
        ...


# --------------------------------------------------------------------------------------------
# Ground truth

@dataclass
class FrameTruth:
    """Ground truth of one frame; either part may be None (not annotated)."""

    boxes_xyxy_px: Optional[np.ndarray] = None
    class_ids: Optional[np.ndarray] = None
    mask: Optional[np.ndarray] = None


@dataclass
class GroundTruth:
    """Ground truth per camera topic, keyed by header stamp (ns) or by frame index.

    ``tolerance_ns`` allows stamp matching to the nearest annotation within that distance.
    """

    key: str = 'stamp'  # 'stamp' or 'index'
    tolerance_ns: int = 0
    boxes: dict = field(default_factory=dict)  # (topic|None, key) -> (boxes, class_ids)
    masks: dict = field(default_factory=dict)  # (topic|None, key) -> PNG bytes
    unknown_class_boxes: int = 0
    _sorted: dict = field(default_factory=dict, repr=False)

    def __bool__(self) -> bool:
        return bool(self.boxes or self.masks)

    @property
    def has_boxes(self) -> bool:
        """True when any frame has box annotations."""
        return bool(self.boxes)

    @property
    def has_masks(self) -> bool:
        """True when any frame has a mask annotation."""
        return bool(self.masks)

    def _find(self, table: dict, topic: str, value: int) -> Any:
        for t in (topic, None):
            if (t, value) in table:
                return table[(t, value)]
        if self.key != 'stamp' or not self.tolerance_ns:
            return None
        for t in (topic, None):
            cache_key = (id(table), t)
            if cache_key not in self._sorted:
                self._sorted[cache_key] = np.asarray(sorted(k for tt, k in table if tt == t),
                                                     np.int64)
            stamps = self._sorted[cache_key]
            if not stamps.size:
                continue
            i = int(np.searchsorted(stamps, value))
            near = [s for s in stamps[max(0, i - 1):i + 1] if abs(int(s) - value) <=
                    self.tolerance_ns]
            if near:
                best = min(near, key=lambda s: abs(int(s) - value))
                return table[(t, int(best))]
        return None

    def lookup(self, topic: str, stamp_ns: int, index: int) -> FrameTruth:
        """Ground truth of the frame ``index`` of ``topic`` with header stamp ``stamp_ns``."""
        import cv2
        value = stamp_ns if self.key == 'stamp' else index
        truth = FrameTruth()
        found = self._find(self.boxes, topic, value)
        if found is not None:
            truth.boxes_xyxy_px, truth.class_ids = found
        png = self._find(self.masks, topic, value)
        if png is not None:
            truth.mask = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
        return truth

    def add_mask(self, topic: Optional[str], value: int, mask: np.ndarray) -> None:
        """Store a mask (losslessly PNG-compressed in memory)."""
        import cv2
        ok, buf = cv2.imencode('.png', np.ascontiguousarray(mask, np.uint8))
        if not ok:
            raise BagError(f'could not store the ground-truth mask of {topic} {value}')
        self.masks[(topic, int(value))] = buf.tobytes()


def parse_topic_map(items: Sequence[str], cameras: Sequence[str], what: str) -> dict[str, str]:
    """``['GT']`` (one camera) or ``['CAMERA=GT', ...]`` -> {camera topic: GT topic}."""
    out: dict[str, str] = {}
    for item in items:
        if '=' in item:
            cam, gt = item.split('=', 1)
            out[cam] = gt
        elif len(cameras) == 1:
            out[cameras[0]] = item
        else:
            raise ParameterError(f'{what} {item!r}: with several camera topics '
                                 f'({", ".join(cameras)}) write CAMERA_TOPIC=GT_TOPIC')
    return out


def load_bag_truth(reader: BagReader, det_topics: dict[str, str], mask_topics: dict[str, str],
                   class_names: Sequence[str], tolerance_ns: int = 0) -> tuple[GroundTruth,
                                                                             Optional[str]]:
    """Ground truth from the bag's Detection2DArray and mono8 mask topics, keyed by stamp.

    Returns (ground truth, error): a damaged bag gives what was read before the damage and the
    error text (the frame loop will meet the same damage and stop there).
    """
    gt = GroundTruth(key='stamp', tolerance_ns=tolerance_ns)
    reader.require_topics(det_topics.values(), (DETECTIONS_TYPE,))
    reader.require_topics(mask_topics.values(), (IMAGE_TYPE, COMPRESSED_TYPE))
    owner = {**{v: ('det', k) for k, v in det_topics.items()},
             **{v: ('mask', k) for k, v in mask_topics.items()}}
    if not owner:
        return gt, None
    try:
        for m in reader.messages(owner):
            kind, camera = owner[m.topic]
            stamp = header_stamp_ns(m.msg, m.log_time_ns)
            if kind == 'det':
                boxes, ids, _scores, unknown = decode_detections(m.msg, class_names, m.topic,
                                                                 m.index)
                gt.unknown_class_boxes += unknown
                gt.boxes[(camera, stamp)] = (boxes, ids)
            else:
                gt.add_mask(camera, stamp, decode_mask(m.msg, m.msgtype, m.topic, m.index))
    except BagError as err:
        return gt, str(err)
    return gt, None


def load_coco_truth(path: os.PathLike | str, class_names: Sequence[str],
                    mask_dir: Optional[os.PathLike | str] = None, key: str = 'index',
                    tolerance_ns: int = 0) -> GroundTruth:
    """Ground truth from a COCO JSON file and/or a folder of PNG class masks.

    COCO images are matched by their ``stamp_ns`` field (``key='stamp'``) or ``frame_index``
    field (``key='index'``; the image ``id`` when absent); an optional ``topic`` field ties an
    image to one camera topic. Categories are matched to ``class_names`` by name. Masks are
    ``<stamp_ns or frame index>.png`` (8-bit, class ids, 255 = ignore).
    """
    if key not in ('stamp', 'index'):
        raise ParameterError(f"ground-truth key must be 'stamp' or 'index', got {key!r}")
    gt = GroundTruth(key=key, tolerance_ns=tolerance_ns)
    if path is not None:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ParameterError(f'{path}: cannot read COCO ground truth: {err}') from None
        lookup = {n: i for i, n in enumerate(class_names)}
        cats = {c['id']: lookup.get(c['name']) for c in data.get('categories', [])}
        images = {}
        for img in data.get('images', []):
            field_name = 'stamp_ns' if key == 'stamp' else 'frame_index'
            if key == 'stamp' and field_name not in img:
                raise ParameterError(f'{path}: image id {img.get("id")} has no stamp_ns field '
                                     '(needed with key=stamp)')
            images[img['id']] = (img.get('topic'), int(img.get(field_name, img['id'])))
            gt.boxes.setdefault(images[img['id']], (np.zeros((0, 4)), np.zeros(0, np.int64)))
        per_image: dict = {}
        for ann in data.get('annotations', []):
            if ann.get('iscrowd', 0):
                continue
            cid = cats.get(ann['category_id'])
            if cid is None:
                gt.unknown_class_boxes += 1
                continue
            if ann.get('image_id') not in images:
                raise ParameterError(f'{path}: annotation {ann.get("id")} refers to image id '
                                     f'{ann.get("image_id")!r}, which is not in "images"')
            x, y, w, h = ann['bbox']
            per_image.setdefault(images[ann['image_id']], []).append((x, y, x + w, y + h, cid))
        for k, rows in per_image.items():
            arr = np.asarray(rows, np.float64)
            gt.boxes[k] = (arr[:, :4], arr[:, 4].astype(np.int64))
    if mask_dir is not None:
        import cv2
        if not Path(mask_dir).is_dir():
            raise ParameterError(f'{mask_dir}: ground-truth mask folder does not exist')
        if not any(f.stem.isdigit() for f in Path(mask_dir).glob('*.png')):
            raise ParameterError(f'{mask_dir}: no <{"stamp_ns" if key == "stamp" else "index"}>'
                                 '.png ground-truth masks in this folder')
        for f in sorted(Path(mask_dir).glob('*.png')):
            if not f.stem.isdigit():
                continue
            mask = cv2.imread(str(f), cv2.IMREAD_UNCHANGED)
            if mask is None or mask.ndim != 2:
                raise ParameterError(f'{f}: ground-truth mask must be a single-channel PNG')
            gt.add_mask(None, int(f.stem), mask)
    return gt


# --------------------------------------------------------------------------------------------
# The evaluation state

@dataclass
class Evaluation:
    """Everything a report is made from; merge() adds another run's state."""

    class_names: list
    class_colors: np.ndarray
    tasks: tuple
    detection: DetectionAccumulator = field(init=False)
    segmentation: ConfusionMatrix = field(init=False)
    latency: LatencyAccumulator = field(default_factory=LatencyAccumulator)
    bags: list = field(default_factory=list)  # one dict per bag (provenance, status, counts)
    frames: int = 0
    frames_per_topic: dict = field(default_factory=dict)
    frames_with_box_truth: int = 0
    frames_with_mask_truth: int = 0
    arrivals: dict = field(default_factory=dict)  # 'bag topic' -> ([log ns], [total ms])
    overlays: list = field(default_factory=list)  # (caption, PNG bytes)
    wall_s: float = 0.0  # replay time, warm-up excluded
    interrupted: bool = False
    # warm-up done before timing: {'iterations': n, 'sizes_hw_px': [[h, w], ...], 'seconds': s}
    warmup: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.detection = DetectionAccumulator(self.class_names)
        self.segmentation = ConfusionMatrix(len(self.class_names))

    def merge(self, other: Evaluation) -> None:
        """Add another evaluation (another bag or worker) of the same classes."""
        self.detection.merge(other.detection)
        self.segmentation.merge(other.segmentation)
        self.latency.merge(other.latency)
        self.bags += other.bags
        self.frames += other.frames
        for t, n in other.frames_per_topic.items():
            self.frames_per_topic[t] = self.frames_per_topic.get(t, 0) + n
        self.frames_with_box_truth += other.frames_with_box_truth
        self.frames_with_mask_truth += other.frames_with_mask_truth
        self.arrivals.update(other.arrivals)
        self.overlays += other.overlays
        self.wall_s += other.wall_s
        self.interrupted |= other.interrupted
        if other.warmup:
            mine = self.warmup or {'iterations': other.warmup['iterations'],
                                   'sizes_hw_px': [], 'seconds': 0.0}
            mine['sizes_hw_px'] += [s for s in other.warmup['sizes_hw_px']
                                    if s not in mine['sizes_hw_px']]
            mine['seconds'] += other.warmup['seconds']
            self.warmup = mine

    def drops(self) -> dict:
        """Return simulated one-slot drops per camera stream, and in total."""
        per = {k: simulate_one_slot_drops(a, s) for k, (a, s) in self.arrivals.items()}
        frames = sum(v['frames'] for v in per.values())
        dropped = sum(v['dropped_frames'] for v in per.values())
        return {'per_stream': per, 'frames': frames, 'dropped_frames': dropped,
                'drop_rate': dropped / frames if frames else None}


@dataclass
class ReplayOptions:
    """What to read from a bag and how to pair ground truth."""

    camera_topics: Sequence[str] = ()  # empty: every Image / CompressedImage topic
    gt_detections: Sequence[str] = ()  # 'GT' or 'CAMERA=GT'
    gt_masks: Sequence[str] = ()
    coco_truth: Optional[GroundTruth] = None
    stamp_tolerance_ns: int = 0
    max_frames: Optional[int] = None  # per bag
    overlays: int = 6  # per bag
    hash_bags: bool = True
    # Pipeline.warmup(iterations) on each new input size before its first timed frame (0: off)
    warmup_iterations: int = 2
    # (height, width) sizes this process's predictor has been warmed up on: the predictor and
    # these options live together (one run_replay, or one worker process), so a size is warmed
    # once however many bags follow
    warmed_sizes: set = field(default_factory=set)
    # a new bag with the camera topics and the predictions (None: none); with several input
    # bags (write_bag_per_input) it is a folder holding one output bag per input bag, by name
    write_bag: Optional[str] = None
    write_bag_storage: Optional[str] = None  # 'mcap' | 'sqlite3'; None: the input's storage
    write_bag_per_input: bool = False


def evaluate_bag(path: os.PathLike | str, predictor: Predictor, options: ReplayOptions,
                 evaluation: Evaluation, progress: Optional[Callable[[int], None]] = None,
                 on_total: Optional[Callable[[int], None]] = None) -> None:
    """Replay one bag into ``evaluation``, recording bag errors instead of raising them.

    A BagError is recorded in the bag's entry (``status`` 'failed' or 'partial', ``error``)
    with everything before it kept.

    KeyboardInterrupt is recorded (``status`` 'interrupted') and re-raised.
    """
    info: dict = {'path': str(path), 'status': 'running', 'error': None, 'frames': 0}
    evaluation.bags.append(info)
    start = time.perf_counter()
    warmup_s_before = evaluation.warmup.get('seconds', 0.0)
    try:
        if options.hash_bags:
            info.update(bag_hash(path))
        with BagReader(path) as reader:
            info['storage'] = reader.storage
            info['recovered'] = reader.recovered
            if reader.open_error:
                info['open_error'] = reader.open_error
            info['topics'] = reader.topics
            _replay(reader, predictor, options, evaluation, info, progress, on_total)
        info['status'] = 'complete' if info['error'] is None else 'partial'
    except KeyboardInterrupt:
        info['status'] = 'interrupted'
        evaluation.interrupted = True
        raise
    except MambaPerceptionError as err:
        info['error'] = str(err)
        info['status'] = 'partial' if info['frames'] else 'failed'
    finally:
        evaluation.wall_s += (time.perf_counter() - start
                              - (evaluation.warmup.get('seconds', 0.0) - warmup_s_before))


def warm_up(predictor: Any, size_hw: tuple, options: ReplayOptions, evaluation: Evaluation,
            info: Optional[dict] = None) -> None:
    """Warm ``predictor`` up on frames of ``size_hw`` unless done already (outside timing).

    As the node does at configure (``warmup_size_px``), one-off costs (allocation, kernel
    selection, compilation, CUDA graph capture) are paid by ``Pipeline.warmup`` on dummy
    frames of the size about to be timed, so they do not land in the latency distribution.
    Predictors without a ``warmup`` method (test oracles) are left alone.
    """
    size = (int(size_hw[0]), int(size_hw[1]))
    warm = getattr(predictor, 'warmup', None)
    if options.warmup_iterations <= 0 or warm is None or size in options.warmed_sizes:
        return
    t0 = time.perf_counter()
    warm([size], iterations=options.warmup_iterations)
    seconds = time.perf_counter() - t0
    options.warmed_sizes.add(size)
    record = evaluation.warmup or {'iterations': options.warmup_iterations, 'sizes_hw_px': [],
                                   'seconds': 0.0}
    if list(size) not in record['sizes_hw_px']:
        record['sizes_hw_px'].append(list(size))
    record['seconds'] += seconds
    evaluation.warmup = record
    if info is not None:
        info.setdefault('warmup_sizes_hw_px', []).append(list(size))
    log.info('warmed up on %dx%d frames in %.2f s', size[1], size[0], seconds)


def _replay(reader: BagReader, predictor: Predictor, options: ReplayOptions,
            evaluation: Evaluation, info: dict, progress: Optional[Callable[[int], None]],
            on_total: Optional[Callable[[int], None]]) -> None:
    gt_topics = {item.split('=', 1)[-1] for item in (*options.gt_detections, *options.gt_masks)}
    cameras = [c for c in (list(options.camera_topics) or reader.camera_topics())
               if c not in gt_topics]
    gt_det = parse_topic_map(options.gt_detections, cameras, '--gt-detections')
    gt_mask = parse_topic_map(options.gt_masks, cameras, '--gt-masks')
    if not cameras:
        raise BagError(f'{reader.path}: no camera topics (sensor_msgs/Image or '
                       f'CompressedImage); topics: {reader.topics}')
    reader.require_topics(cameras, CAMERA_TYPES)
    reader.require_topics(gt_det)
    reader.require_topics(gt_mask)
    info['camera_topics'] = cameras
    truth, truth_error = load_bag_truth(reader, gt_det, gt_mask, predictor.class_names,
                                        options.stamp_tolerance_ns)
    if options.coco_truth is not None:
        truth = options.coco_truth
    info['gt_unknown_class_boxes'] = truth.unknown_class_boxes
    if truth_error:
        log.warning('ground truth: %s', truth_error)
    counts = reader.message_counts
    total = sum(counts[c] or 0 for c in cameras)
    if options.max_frames:
        total = min(total, options.max_frames) if total else options.max_frames
    info['frames_expected'] = total or None
    if on_total is not None:
        on_total(total)
    every = max(1, (total or 60) // max(1, options.overlays)) if options.overlays else 0
    out = (PredictionBag.open(reader, options, info, cameras) if options.write_bag
           else None)
    try:
        for m in reader.messages(cameras):
            if options.max_frames and info['frames'] >= options.max_frames:
                break
            t0 = time.perf_counter()
            rgb = decode_image(m.msg, m.msgtype, m.topic, m.index)
            decode_ms = (time.perf_counter() - t0) * 1e3
            stamp = header_stamp_ns(m.msg, m.log_time_ns)
            try:
                warm_up(predictor, rgb.shape[:2], options, evaluation, info)
                result = predictor(rgb)
            except MambaPerceptionError as err:
                raise BagError(f'topic {m.topic!r} message {m.index}: the pipeline refused the '
                               f'frame: {err}') from None
            result.times.decode_ms = decode_ms
            key = f'{Path(info["path"]).name} {m.topic} #{m.index}'
            frame_truth = truth.lookup(m.topic, stamp, m.index) if truth else FrameTruth()
            if frame_truth.boxes_xyxy_px is not None or frame_truth.mask is not None:
                info['frames_with_truth'] = info.get('frames_with_truth', 0) + 1
            score_frame(evaluation, predictor, result, frame_truth, key)
            evaluation.latency.add(result.times)
            stream = f'{info["path"]} {m.topic}'
            arr = evaluation.arrivals.setdefault(stream, ([], []))
            arr[0].append(m.log_time_ns)
            arr[1].append(result.times.total_ms)
            evaluation.frames += 1
            evaluation.frames_per_topic[m.topic] = evaluation.frames_per_topic.get(m.topic, 0) + 1
            info['frames'] += 1
            if every and (info['frames'] - 1) % every == 0 and \
                    info.get('overlays', 0) < options.overlays:
                info['overlays'] = info.get('overlays', 0) + 1
                evaluation.overlays.append((key, overlay_png(rgb, result, frame_truth,
                                                             predictor.class_colors)))
            if out is not None:
                out.write(m, result)
            if progress is not None:
                progress(1)
    finally:
        if out is not None:
            out.close()
    if truth_error and info['error'] is None:
        info['error'] = truth_error
    if truth and info['frames'] and not info.get('frames_with_truth'):
        how = ('header stamp (ns)' if truth.key == 'stamp' else
               'frame index (0-based, per camera topic)')
        warning = (f'ground truth was given but none of the {info["frames"]} frames of this bag '
                   f'matched it by {how}: check --gt-key (index|stamp), the COCO '
                   f'frame_index/stamp_ns fields, the mask file names or --stamp-tolerance-ms')
        info.setdefault('warnings', []).append(warning)
        log.warning('%s: %s', info['path'], warning)


def prediction_topics(camera_topic: str) -> tuple[str, str]:
    """``/camera/image_raw`` -> (``/camera/detections``, ``/camera/segmentation/mask``)."""
    base = camera_topic.rstrip('/')
    if base.endswith('/compressed'):
        base = base[:-len('/compressed')]
    head = base.rsplit('/', 1)[0] if base.count('/') > 1 else base
    return f'{head}/detections', f'{head}/segmentation/mask'


class PredictionBag:
    """A new bag: the camera topics as read, plus each frame's predictions beside them.

    Per camera topic ``<base>/detections`` (vision_msgs/Detection2DArray, class ids as the node
    writes them: the class index as a string) and ``<base>/segmentation/mask`` (mono8 class
    ids); both carry the source image's header and log time, so Foxglove / RViz show them with
    their frame. The bag is closed (and readable) however the replay ends.
    """

    def __init__(self, writer: BagWriter, info: dict, cameras: Sequence[str]) -> None:
        self.writer = writer
        self.info = info
        self.topics = {c: prediction_topics(c) for c in cameras}

    @classmethod
    def open(cls, reader: BagReader, options: ReplayOptions, info: dict,
             cameras: Sequence[str]) -> PredictionBag:
        """Create the output bag for ``reader``'s bag (BagError when it exists)."""
        target = Path(options.write_bag)
        if options.write_bag_per_input:
            target = target / Path(reader.path).stem
            target.parent.mkdir(parents=True, exist_ok=True)
        storage = options.write_bag_storage or (reader.storage if reader.storage in
                                                ('mcap', 'sqlite3') else 'mcap')
        topics = {c: prediction_topics(c) for c in cameras}
        clash = sorted({t for pair in topics.values() for t in pair} & set(cameras))
        if clash:
            raise BagError(f'{target}: prediction topic(s) {clash} would overwrite camera topics')
        writer = BagWriter(target, storage)
        writer.__enter__()
        info['predictions_bag'] = {
            'path': str(target), 'storage': storage,
            'topics': {c: {'detections': d, 'mask': m} for c, (d, m) in topics.items()},
            'messages': {}}
        return cls(writer, info, cameras)

    def _put(self, topic: str, msgtype: str, msg: Any, log_time_ns: int) -> None:
        self.writer.write(topic, msgtype, msg, log_time_ns)
        counts = self.info['predictions_bag']['messages']
        counts[topic] = counts.get(topic, 0) + 1

    def write(self, m: Any, result: FrameResult) -> None:
        """Write camera message ``m`` and the predictions ``result`` made from it."""
        det_topic, mask_topic = self.topics[m.topic]
        self._put(m.topic, m.msgtype, m.msg, m.log_time_ns)
        stamp = header_stamp_ns(m.msg, m.log_time_ns)
        frame_id = str(getattr(getattr(m.msg, 'header', None), 'frame_id', ''))
        store = self.writer.store
        d = result.detections
        if d is not None:
            self._put(det_topic, DETECTIONS_TYPE, detections_msg(
                store, stamp, d.boxes_xyxy_px, [str(int(c)) for c in d.class_ids],
                [float(s) for s in d.scores], frame_id=frame_id), m.log_time_ns)
        if result.class_mask is not None:
            self._put(mask_topic, IMAGE_TYPE, image_msg(
                store, np.asarray(result.class_mask).astype(np.uint8), stamp, frame_id,
                'mono8'), m.log_time_ns)

    def close(self) -> None:
        """Finish the bag (its metadata / summary)."""
        self.writer.__exit__(None, None, None)


def score_frame(evaluation: Evaluation, predictor: Any, result: FrameResult,
                truth: FrameTruth, key: str) -> None:
    """Add one frame's result and ground truth to the accumulators (offline and live)."""
    if 'detection' in predictor.tasks and truth.boxes_xyxy_px is not None:
        evaluation.detection.add(result.height_px, result.width_px, truth.boxes_xyxy_px,
                                 truth.class_ids, result.detections, key)
        evaluation.frames_with_box_truth += 1
    if 'segmentation' in predictor.tasks and truth.mask is not None \
            and result.class_mask is not None:
        evaluation.segmentation.add(truth.mask, result.class_mask, key)
        evaluation.frames_with_mask_truth += 1


def overlay_png(rgb: np.ndarray, result: FrameResult, truth: FrameTruth, colors: np.ndarray,
                width_px: int = OVERLAY_WIDTH_PX) -> bytes:
    """Render a small PNG of the frame with predictions and ground truth drawn on it.

    The predicted mask is blended in, predicted boxes are in class colours, ground-truth boxes
    in white.
    """
    import cv2
    img = rgb.astype(np.float32)
    colors = np.asarray(colors, np.uint8).reshape(-1, 3)
    if result.class_mask is not None and len(colors):
        tint = colors[np.clip(result.class_mask, 0, len(colors) - 1)].astype(np.float32)
        img = 0.6 * img + 0.4 * tint
    img = np.ascontiguousarray(img.clip(0, 255).astype(np.uint8))
    if truth.boxes_xyxy_px is not None:
        for b in truth.boxes_xyxy_px:
            cv2.rectangle(img, (int(b[0]), int(b[1])), (int(b[2]), int(b[3])), (255, 255, 255), 1)
    if result.detections is not None:
        d = result.detections
        for b, c, s in zip(d.boxes_xyxy_px, d.class_ids, d.scores, strict=True):
            color = tuple(int(v) for v in colors[int(c) % len(colors)]) if len(colors) else (
                255, 0, 0)
            cv2.rectangle(img, (int(b[0]), int(b[1])), (int(b[2]), int(b[3])), color, 2)
            cv2.putText(img, f'{int(c)}:{s:.2f}', (int(b[0]), max(10, int(b[1]) - 3)),
                        cv2.FONT_HERSHEY_SIMPLEX, 0.4, color, 1, cv2.LINE_AA)
    scale = width_px / img.shape[1]
    if scale < 1:
        img = cv2.resize(img, (width_px, max(1, round(img.shape[0] * scale))),
                         interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode('.png', cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    return buf.tobytes() if ok else b''


def new_evaluation(predictor: Predictor) -> Evaluation:
    """Return an empty evaluation for ``predictor``'s classes and tasks."""
    return Evaluation(list(predictor.class_names), np.asarray(predictor.class_colors),
                      tuple(predictor.tasks))


def evaluate_bags(paths: Iterable[os.PathLike | str], predictor: Predictor,
                  options: ReplayOptions, evaluation: Optional[Evaluation] = None,
                  progress: Optional[Callable[[int], None]] = None,
                  on_total: Optional[Callable[[int], None]] = None) -> Evaluation:
    """Replay bags one after another in this process (KeyboardInterrupt propagates)."""
    evaluation = evaluation or new_evaluation(predictor)
    for path in paths:
        evaluate_bag(path, predictor, options, evaluation, progress, on_total)
    return evaluation


__all__ = ['Evaluation', 'FrameTruth', 'GroundTruth', 'PredictionBag', 'Predictor',
           'ReplayOptions', 'prediction_topics',
           'evaluate_bag', 'evaluate_bags', 'load_bag_truth', 'load_coco_truth',
           'new_evaluation', 'overlay_png', 'parse_topic_map', 'score_frame', 'warm_up']
