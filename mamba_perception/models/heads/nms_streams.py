"""Run many independent ``torchvision.ops`` NMS calls side by side on CUDA streams.

Why: torchvision's CUDA NMS ends in ``gather_keep_from_mask``, a one-block kernel that walks the
boxes one by one (about 0.2 ms for 1000 boxes on an H100), and then synchronises the host to
size its output. Mask R-CNN inference runs one NMS per image and FPN level (5 per image, 20 for
4 cameras), so one after another they cost ~1 ms of a mostly idle GPU per image plus a host
round trip each. The calls are independent: here each runs in a worker thread on its own
stream, so the host waits are concurrent (torch ops release the GIL while they wait) and the
one-block kernels may overlap. Measured on H100s: 20 calls of 1000 boxes 8.4 -> 6.0 ms (the GPU
passes overlap only partly; bench/results/nms_streams_h100.json), the det+seg pipeline 0.7-0.9
ms faster at batch 1 and 1.7-1.9 ms at batch 4 (bench/PERF_NOTES.md, "Pipeline"). Results are
exactly those of the calls made one by one.

On the CPU, or for a single call, the calls simply run in order.
"""

from concurrent.futures import ThreadPoolExecutor
import threading
from typing import Sequence

import torch
from torchvision.ops import batched_nms, nms

MAX_STREAMS = 16  # concurrent NMS calls (and worker threads) per process

_lock = threading.Lock()
_pool: list = []  # [ThreadPoolExecutor], created on first use
_streams: dict = {}  # device index -> [torch.cuda.Stream]


def _executor() -> ThreadPoolExecutor:
    with _lock:
        if not _pool:
            _pool.append(ThreadPoolExecutor(MAX_STREAMS, thread_name_prefix='nms'))
        return _pool[0]


def _side_streams(device: torch.device) -> list:
    index = device.index if device.index is not None else torch.cuda.current_device()
    with _lock:
        if index not in _streams:
            _streams[index] = [torch.cuda.Stream(index) for _ in range(MAX_STREAMS)]
        return _streams[index]


def nms_each(groups: Sequence[tuple], iou_threshold: float) -> list[torch.Tensor]:
    """``nms(boxes, scores)`` or ``batched_nms(boxes, scores, idxs)`` of every group.

    Args:
        groups: ``(boxes (N, 4), scores (N,))`` or ``(boxes, scores, idxs (N,))`` tuples, all
            on one device; the three-element form runs ``batched_nms`` (NMS within each idx).
        iou_threshold: as torchvision's.

    Returns:
        One int64 index tensor per group, as torchvision returns it (decreasing score).
    """
    def one(group: tuple) -> torch.Tensor:
        return nms(*group, iou_threshold) if len(group) == 2 else batched_nms(*group,
                                                                              iou_threshold)

    if not groups:
        return []
    device = groups[0][0].device
    if device.type != 'cuda' or len(groups) == 1:
        return [one(g) for g in groups]
    main = torch.cuda.current_stream(device)
    streams = _side_streams(device)
    inference = torch.is_inference_mode_enabled()

    def on_stream(k: int, group: tuple) -> torch.Tensor:
        stream = streams[k % len(streams)]
        # grad mode, inference mode and the current stream are thread-local: set them here
        with torch.inference_mode(inference), torch.cuda.stream(stream):
            keep = one(group)
        keep.record_stream(main)  # allocated on the side stream, used on main after this
        return keep

    used = streams[:len(groups)]
    for stream in used:
        stream.wait_stream(main)  # the inputs were produced on main
    # More groups than streams: some share a stream (legal from several threads; they queue).
    executor = _executor()
    futures = [executor.submit(on_stream, k, g) for k, g in enumerate(groups)]
    keeps = [f.result() for f in futures]
    for stream in used:
        main.wait_stream(stream)
    for k, group in enumerate(groups):  # the inputs, allocated on main, were read on a side
        for t in group:                 # stream: their memory must not be reused before that
            t.record_stream(streams[k % len(streams)])
    return keeps
