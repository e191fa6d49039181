"""Which change moves the Pipeline's time? One process, one machine, det+seg 720p, CUDA graphs.

Times ``pipe(frames)`` at batch 1 and 4 as committed, then with the per-level / per-frame NMS
calls run one after another instead of side by side (``nms_streams.nms_each``), then with the
heads' conv weights back in NCHW; and, on the same dense outputs, the mask postprocess on
channels-last vs contiguous logits and the batched box selection vs the previous per-frame
code. Random weights (``create_random_bundle``); needs a CUDA GPU. Writes
``$OUT/pipeline_factors_h100.json``::

    OUT=bench/results python bench/pipeline_factors.py
"""

import datetime
import json
import os
import platform
import sys

import numpy as np
import torch
from torchvision.ops import batched_nms, nms, remove_small_boxes

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import wall_ms  # noqa: E402

from mamba_perception.models.bundle import create_random_bundle
import mamba_perception.models.heads.detection as detection
import mamba_perception.models.heads.nms_streams as nms_streams
import mamba_perception.pipeline as pipeline

METHOD = (
    'One process, one Pipeline (VMamba-T + Mask R-CNN + UperNet, random weights, fp16, CUDA '
    'graphs); each number is the p50 in ms of 40 synchronised calls (perf_counter) after 5 '
    'warm-up calls. pipeline_threads: pipe(frames) as committed; pipeline_sequential: the same '
    'with nms_each replaced by one NMS call after another; pipeline_threads_heads_nchw: the '
    "heads' conv weights back in NCHW (graphs recaptured). masks_*: _postprocess_masks plus the "
    'host copy, on the channels-last logits as produced vs a contiguous copy. select_*: box '
    'selection plus the host copy; select_batch = select_detections_batch (all frames in one '
    'call), select_old = the previous per-frame code (threshold, remove_small_boxes, batched_nms, '
    'each with its own synchronisation); none_pass = the random-weight candidates (no score '
    'above 0.3), some_pass = their scores x25 (thousands pass, 100 kept per frame).')


def sequential_nms(groups, iou):
    """nms_each without the side streams: one call after another."""
    return [nms(*g, iou) if len(g) == 2 else batched_nms(*g, iou) for g in groups]


def select_per_frame(boxes, scores, class_ids, threshold, iou, max_detections):
    """Select one frame's boxes as the code did before select_detections_batch."""
    keep = scores > threshold
    boxes, scores, class_ids = boxes[keep].float(), scores[keep].float(), class_ids[keep]
    keep = remove_small_boxes(boxes, pipeline.MIN_BOX_SIZE_PX)
    boxes, scores, class_ids = boxes[keep], scores[keep], class_ids[keep]
    keep = batched_nms(boxes, scores, class_ids, iou)[:max_detections]
    return boxes[keep], scores[keep], class_ids[keep]


def p50_ms(fn, reps=40):
    return round(float(np.median(wall_ms(fn, iters=reps, warmup=5))), 3)


def set_nms(fn):
    detection.nms_each = pipeline.nms_each = fn


def set_head_layout(pipe, memory_format):
    for head in (pipe.model.detector, pipe.model.decode_head):
        head.to(memory_format=memory_format)
    pipe._graphs.clear()  # recapture with the new weights


def measure_batch(pipe, batch, rng):
    frames = [rng.integers(0, 256, (720, 1280, 3), dtype=np.uint8) for _ in range(batch)]
    row = {'batch': batch}
    for name, fn in (('threads', nms_streams.nms_each), ('sequential', sequential_nms)):
        set_nms(fn)
        row[f'pipeline_{name}'] = p50_ms(lambda: pipe(frames))
    set_nms(nms_streams.nms_each)
    tensors = [pipeline.validate_frame(f, i).cuda() for i, f in enumerate(frames)]
    geometry = [(720, 1280, *pipeline.resized_size(720, 1280, pipe.input_policy))
                for _ in tensors]
    shape = pipeline.padded_size(*geometry[0][2:], pipe._pad)
    with torch.inference_mode():
        dense = pipe._dense(pipe._preprocess(tensors, geometry, shape))
        with pipe.autocast():
            candidates = pipe.model.detect(dense, [(g[2], g[3]) for g in geometry])
        logits = dense['seg_logits']
        row['logits_channels_last'] = logits.is_contiguous(memory_format=torch.channels_last)
        for name, lg in (('as_is', logits), ('contiguous', logits.contiguous())):
            row[f'masks_{name}'] = p50_ms(
                lambda lg=lg: [m.cpu() for m in pipe._postprocess_masks(lg, geometry)])
        scaled = [(b, s * 25, c) for b, s, c in candidates]
        for tag, cands in (('none_pass', candidates), ('some_pass', scaled)):
            row[f'select_batch_{tag}'] = p50_ms(lambda cands=cands: [
                tuple(t.cpu() for t in d)
                for d in pipeline.select_detections_batch(cands, 0.3, 0.5, 100)])
            row[f'select_old_{tag}'] = p50_ms(lambda cands=cands: [
                tuple(t.cpu() for t in select_per_frame(*c, 0.3, 0.5, 100)) for c in cands])
            row[f'kept_{tag}'] = [len(select_per_frame(*c, 0.3, 0.5, 100)[1]) for c in cands]
    set_head_layout(pipe, torch.contiguous_format)
    row['pipeline_threads_heads_nchw'] = p50_ms(lambda: pipe(frames))
    set_head_layout(pipe, torch.channels_last)
    return row


def main() -> int:
    bundle = create_random_bundle(backbone='vmamba_tiny', tasks=('detection', 'segmentation'),
                                  num_classes=80)
    pipe = pipeline.Pipeline(bundle, device='cuda', precision='fp16', cuda_graphs=True)
    rng = np.random.default_rng(0)
    rows = []
    for batch in (1, 4):
        rows.append(measure_batch(pipe, batch, rng))
        print(rows[-1], flush=True)
    report = {
        'question': "Which of this stop's changes moves the Pipeline's time (det+seg 1280x720)?",
        'command': ' '.join([sys.executable, *sys.argv]),
        'date_utc': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
        'gpu': torch.cuda.get_device_name(0),
        'versions': {'torch': torch.__version__, 'python': platform.python_version(),
                     'torchvision': __import__('torchvision').__version__},
        'method': METHOD, 'rows': rows,
    }
    out = os.path.join(os.environ.get('OUT', '/tmp/out'), 'pipeline_factors_h100.json')
    with open(out, 'w') as f:
        json.dump(report, f, indent=1)
    print('->', out)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
