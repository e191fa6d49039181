"""Frames in, detections and class masks out: the ROS-free perception pipeline.

::

    pipe = Pipeline('vmamba_tiny_coco.safetensors', device='cuda', precision='fp16')
    result = pipe(frame)                  # uint8 (H, W, 3) RGB -> FrameResult
    results = pipe([front, left, right])  # several cameras, any sizes -> list[FrameResult]

Stages (each timed: CUDA events on GPU, ``perf_counter`` on CPU):

1. **preprocess** (on the device): upload, resize keeping the aspect ratio under the bundle's
   input policy (bilinear, ``align_corners=False``, as mmcv/cv2 ``INTER_LINEAR``), normalise with
   the bundle's mean/std, pad bottom/right with zeros to a multiple of 32.
2. **inference** under fp16/bf16 autocast: the dense part (backbone, FPN, RPN head and its
   top-n proposals before NMS, UperNet; fixed shapes, optionally ``torch.compile``-d and
   captured in a CUDA graph per input shape), then the sparse part (the proposals' clip to each
   image and NMS, RoI box head).
3. **postprocess** (on the device): score threshold, per-class NMS (``batched_nms``), at most
   ``max_detections`` boxes; the stride-4 class map is argmax-ed and sampled with nearest
   neighbour at every source pixel; then one copy to the host per kind of output for the whole
   batch, where the boxes are mapped to source-image pixels.

Non-finite model output (NaN/Inf: broken weights, fp16 overflow) would otherwise come out as an
all-zero mask and no boxes, like an empty scene. Each frame's outputs are checked on the device
and the flags come back with the results; a call with bad frames raises
:class:`~mamba_perception.errors.NonFiniteOutputError` naming them, which carries the other
frames' results (``exc.results``, ``None`` at the bad frames): one bad camera does not cost the
others their frame.

Frames are batched when their padded network input has the same shape; frames of other shapes
run as separate batches. They are never padded up to a common size, because the selective scans
of VMamba/Vim would carry the padding into the image's features: a frame gives the same result
alone or in any batch.
"""

import logging
import math
import os
import time
from typing import Any, Iterable, Optional, Sequence, Union
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_leaves, tree_map_only

from mamba_perception.errors import (
    InputError,
    NonFiniteOutputError,
    ParameterError,
    SetupError,
)
from mamba_perception.inductor_choices import compile_inference
from mamba_perception.models.bundle import Bundle, load_bundle
from mamba_perception.models.heads.nms_streams import nms_each
from mamba_perception.models.layers import cast_autocast_weights
from mamba_perception.results import Detections, FrameResult, StageTimes

log = logging.getLogger(__name__)

PRECISIONS = {'fp32': torch.float32, 'fp16': torch.float16, 'bf16': torch.bfloat16}
COMPILED_SHAPES_LIMIT = 64  # input shapes compiled per process before dynamo runs eagerly
# Inductor options for compiling the models (Pipeline here, the bench scripts through
# bench/common.compile_kwargs). inplace_buffers off: by default inductor writes a kernel's output
# over an input that dies there (VMamba's out_norm LayerNorm over the scan output), and it picks
# such a kernel's launch configuration on the first call by timing each candidate with that
# input restored inside every timed call (a copy: 0.17-0.25 ms a call at 1280x720, 3.7-4.3 ms at
# 2048^2, against 8-36 us of kernel). The pick is then noise, and inductor's on-disk cache keeps
# it for later processes: stage 1's out_norm ran at 36 instead of 8.4 us a launch in some
# processes (VMamba-T +55 us at 1280x720, H200). Off, such kernels write a new buffer and are
# timed as they run; VMamba-T's time and peak memory are unchanged at 1280x720 and 2048^2, fp16
# and bf16, batches 1 and 4 (H200, bench/results/backbone_speed_inplace_{true,false}_h200.json).
COMPILE_OPTIONS = {'inplace_buffers': False}


def use_compile_cache(path: Union[str, os.PathLike]) -> str:
    """Keep ``torch.compile``'s on-disk caches in ``path`` (created); return its absolute path.

    Inductor caches compiled graphs and their generated kernels on disk (FX graph and AOTAutograd
    caches, on by default) under ``TORCHINDUCTOR_CACHE_DIR``, which defaults to a directory in
    the system temp dir: gone after a reboot on most robots, so every boot would compile again
    (tens of seconds per input shape). A restart of a process that finds its entries there
    loads them instead of compiling. Sets the variable for the whole process.
    """
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise SetupError(f'compile cache directory {path!r} cannot be created: {exc}') from exc
    current = os.environ.get('TORCHINDUCTOR_CACHE_DIR')
    if current and os.path.abspath(current) != path:
        log.warning('torch.compile cache moves from %s to %s for this process', current, path)
    os.environ['TORCHINDUCTOR_CACHE_DIR'] = path
    return path
MIN_BOX_SIZE_PX = 1e-2  # as torchvision's RoIHeads: drop degenerate boxes before NMS
Frame = Union[np.ndarray, torch.Tensor]


# --------------------------------------------------------------------------------------------
# Pure helpers (tested on their own)

def resized_size(height_px: int, width_px: int, policy: dict) -> tuple[int, int]:
    """Network input size (before padding) for a source frame under an input policy.

    The scale is ``min(max_long / long_side, max_short / short_side)`` (mmcv's keep-ratio
    rescale; a ``None`` limit is ignored), capped at 1 unless ``allow_upscale``; each side is
    rounded to the nearest pixel and is at least 1.
    """
    long_side, short_side = max(height_px, width_px), min(height_px, width_px)
    scale = math.inf
    if policy.get('max_long_side_px'):
        scale = min(scale, policy['max_long_side_px'] / long_side)
    if policy.get('max_short_side_px'):
        scale = min(scale, policy['max_short_side_px'] / short_side)
    if not policy.get('allow_upscale', False):
        scale = min(scale, 1.0)
    if math.isinf(scale):
        scale = 1.0
    return max(1, int(height_px * scale + 0.5)), max(1, int(width_px * scale + 0.5))


def padded_size(height_px: int, width_px: int, multiple: int = 32) -> tuple[int, int]:
    """Round both sides up to a multiple of ``multiple``."""
    return (-(-height_px // multiple) * multiple, -(-width_px // multiple) * multiple)


def select_detections(boxes: torch.Tensor, scores: torch.Tensor, class_ids: torch.Tensor,
                      score_threshold: float, nms_iou: float, max_detections: int
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Score threshold (strictly greater), per-class NMS, then the best ``max_detections``.

    Args:
        boxes: (N, 4) xyxy. scores: (N,). class_ids: (N,) int64; NMS runs within each class.

    Returns:
        (boxes, scores, class_ids) sorted by decreasing score.
    """
    return select_detections_batch([(boxes, scores, class_ids)], score_threshold, nms_iou,
                                   max_detections)[0]


def select_detections_batch(candidates: Sequence[tuple], score_threshold: float, nms_iou: float,
                            max_detections: int) -> list[tuple]:
    """:func:`select_detections` of several frames' ``(boxes, scores, class_ids)`` at once.

    Each frame's result is what it would be alone; the threshold of all frames costs one
    host synchronisation and the frames' NMS calls run side by side
    (:func:`~mamba_perception.models.heads.nms_streams.nms_each`).
    """
    sizes = [c[1].shape[0] for c in candidates]

    def joined(which: int) -> torch.Tensor:  # one frame: no copy of its ~80k candidates
        parts = [c[which] for c in candidates]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    boxes, scores, class_ids = joined(0).float(), joined(1).float(), joined(2)
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    # torchvision's remove_small_boxes (>=) after the threshold, as RoIHeads does
    keep = (scores > score_threshold) & (widths >= MIN_BOX_SIZE_PX) & (heights >= MIN_BOX_SIZE_PX)
    # One synchronisation for all frames (and no host-to-device copy: that would be another)
    per_frame = torch.stack([k.sum() for k in keep.split(sizes)]) if len(sizes) > 1 else None
    index = keep.nonzero().squeeze(1)
    counts = per_frame.tolist() if per_frame is not None else [index.numel()]  # GPU idle: cheap
    groups = [(boxes[i], scores[i], class_ids[i]) for i in index.split(counts)]
    keeps = nms_each(groups, nms_iou)
    return [(b[k[:max_detections]], s[k[:max_detections]], c[k[:max_detections]])
            for (b, s, c), k in zip(groups, keeps, strict=True)]


def tensors_to_host(groups: Sequence[Sequence[torch.Tensor]], device: torch.device
                    ) -> list[list[torch.Tensor]]:
    """Copy the groups' tensors to the host, with one device-to-host copy per group.

    Each group (tensors of one dtype, e.g. one per frame) is joined on the device and copied
    into pinned memory without blocking; one synchronisation then waits for all the copies
    (a ``.cpu()`` per tensor waits once each). The host tensors are views of their group's
    copy, in the shapes given. On the CPU nothing is copied to the host: they are views of the
    joined groups (of the tensors themselves for a group of one).
    """
    flat = [torch.cat([t.reshape(-1) for t in g]) if len(g) > 1 else g[0].reshape(-1)
            for g in groups]
    if device.type == 'cuda':
        host = [torch.empty(f.shape, dtype=f.dtype, pin_memory=True) for f in flat]
        for h, f in zip(host, flat, strict=True):
            h.copy_(f, non_blocking=True)
        torch.cuda.current_stream(device).synchronize()
        flat = host
    return [[part.view(t.shape) for part, t in zip(f.split([t.numel() for t in g]), g,
                                                   strict=True)]
            for f, g in zip(flat, groups, strict=True)]


def validate_frame(frame: Any, index: int = 0) -> torch.Tensor:
    """Return ``frame`` as a uint8 (H, W, 3) tensor, or raise :class:`InputError` saying why."""
    what = f'frame {index}'
    if isinstance(frame, np.ndarray):
        array = frame
    elif isinstance(frame, torch.Tensor):
        array = None
    else:
        raise InputError(f'{what}: expected a numpy array or torch tensor (H, W, 3) uint8, got '
                         f'{type(frame).__name__}')
    shape = tuple(frame.shape)
    if len(shape) != 3 or shape[2] != 3:
        raise InputError(f'{what}: shape {shape}, expected (height, width, 3) RGB')
    if shape[0] == 0 or shape[1] == 0:
        raise InputError(f'{what}: empty frame ({shape[0]}x{shape[1]} pixels)')
    dtype = frame.dtype
    if dtype not in (np.uint8, torch.uint8):
        is_float = (np.issubdtype(dtype, np.floating) if array is not None
                    else frame.is_floating_point())
        if is_float and bool(np.isnan(array).any() if array is not None
                             else torch.isnan(frame).any()):
            raise InputError(f'{what}: contains NaN (dtype {dtype}); expected uint8 RGB')
        raise InputError(f'{what}: dtype {dtype}, expected uint8 RGB')
    if array is not None:
        return frame_tensor(np.ascontiguousarray(array))
    return frame


def frame_tensor(array: np.ndarray) -> torch.Tensor:
    """``torch.from_numpy(array)``, also for read-only arrays, without torch's warning.

    Frames are often views of a received message's bytes (read-only); the pipeline only
    reads its input frames, so sharing that memory is safe and a copy would only cost time.
    """
    if array.flags.writeable:
        return torch.from_numpy(array)
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='The given NumPy array is not writable')
        return torch.from_numpy(array)


# --------------------------------------------------------------------------------------------
# Timing

class _Timer:
    """Stage boundaries: CUDA events on GPU (read after one sync), perf_counter on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == 'cuda'
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def times(self) -> StageTimes:
        """Stage times from six marks: three in submit, three in collect.

        Marks: start, preprocessed, dense done (submit); collect started, detected,
        postprocessed (collect). Time between submit and collect (waiting for a thread)
        belongs to no stage.
        """
        if self.cuda:
            self.marks[-1].synchronize()
            ms = [a.elapsed_time(b) for a, b in zip(self.marks[:-1], self.marks[1:], strict=True)]
        else:
            ms = [(b - a) * 1e3 for a, b in zip(self.marks[:-1], self.marks[1:], strict=True)]
        return StageTimes(preprocess_ms=ms[0], inference_ms=ms[1] + ms[3], postprocess_ms=ms[4])


class _PendingBatch:
    """One input shape's frames between :meth:`Pipeline.submit` and :meth:`Pipeline.collect`."""

    def __init__(self, indices: list, geometry: list, dense: dict, timer: '_Timer',
                 stream, done) -> None:
        self.indices = indices  # positions of these frames in the submitted list
        self.geometry = geometry  # (h, w, resized h, resized w) per frame
        self.dense = dense  # forward_dense outputs, queued on `stream`
        self.timer = timer
        self.stream = stream  # CUDA stream the dense part was queued on (None off CUDA)
        self.done = done  # CUDA event recorded behind the dense part (None off CUDA)


class PendingFrames:
    """Frames submitted to a :class:`Pipeline` whose results :meth:`Pipeline.collect` returns."""

    def __init__(self, num_frames: int, batches: list) -> None:
        self.num_frames = num_frames
        self.batches = batches

    def __len__(self) -> int:
        return self.num_frames


class _CudaGraph:
    """One captured dense forward for a fixed input shape (static input and outputs)."""

    def __init__(self, fn, example: torch.Tensor, autocast) -> None:
        self.static_in = example.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):  # warm up (lazy inits, cuDNN/Triton autotuning) off the graph
                with autocast():
                    fn(self.static_in)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: another thread (a node finishing the previous frames on its own
        # stream) may keep launching work and allocating while this thread captures.
        with torch.cuda.graph(self.graph, capture_error_mode='thread_local'):
            with autocast():
                self.static_out = fn(self.static_in)

    def __call__(self, x: torch.Tensor, copy_outputs: bool) -> Any:
        """Replay on x; with ``copy_outputs`` the outputs are copies of the static buffers.

        A batch from :meth:`Pipeline.submit` may be collected after the next replay, which
        would overwrite the static outputs, so submit copies them (one pass over the outputs:
        ~60 MB for det+seg at 1280x720, ~40 µs at the H100's bandwidth, not timed on its own);
        :meth:`Pipeline.run` collects before it replays again and needs no copy.
        """
        self.static_in.copy_(x)
        self.graph.replay()
        if not copy_outputs:
            return self.static_out
        return tree_map_only(torch.Tensor, torch.Tensor.clone, self.static_out)


# --------------------------------------------------------------------------------------------
# The pipeline

class Pipeline:
    """Run a model bundle on camera frames; see the module docstring.

    Args:
        bundle: path of a bundle file, or a loaded :class:`Bundle`.
        device: ``'cpu'``, ``'cuda'``, ``'cuda:1'``, ...
        precision: ``'fp32'``, or ``'fp16'`` / ``'bf16'`` autocast.
        score_threshold: detections with a score at or below are dropped.
        nms_iou: IoU above which the lower-scoring box of the same class is suppressed.
        max_detections: boxes kept per frame after NMS.
        compile: ``torch.compile`` the dense part (first call per input shape is slow).
        compile_cache_dir: with ``compile``, keep the compile caches there
            (:func:`use_compile_cache`), so that a restart loads instead of compiling; None:
            torch's default (a temp directory).
        cuda_graphs: capture the dense part in a CUDA graph per input shape (CUDA only).
        compile_dynamic_batch: with ``compile``, one compiled graph serves every batch size
            above 1 (batch 1 gets its own): a node with n cameras compiles twice at configure
            instead of n times. Its kernels take the batch size at run time, so they may be
            slower than ones specialised to it: off by default until timed on a GPU.
    """

    def __init__(self, bundle: Union[str, os.PathLike, Bundle], device: str = 'cpu',
                 precision: str = 'fp32', score_threshold: float = 0.3, nms_iou: float = 0.5,
                 max_detections: int = 100, compile: bool = False,
                 cuda_graphs: bool = False,
                 compile_cache_dir: Optional[Union[str, os.PathLike]] = None,
                 compile_dynamic_batch: bool = False) -> None:
        if precision not in PRECISIONS:
            raise ParameterError(f'precision {precision!r} is not one of {sorted(PRECISIONS)}')
        if not 0.0 <= score_threshold < 1.0:
            raise ParameterError(f'score_threshold {score_threshold} is not in [0, 1)')
        if not 0.0 < nms_iou <= 1.0:
            raise ParameterError(f'nms_iou {nms_iou} is not in (0, 1]')
        if int(max_detections) < 1:
            raise ParameterError(f'max_detections {max_detections} must be >= 1')
        self.device = torch.device(device)
        if self.device.type == 'cuda' and not torch.cuda.is_available():
            raise SetupError(f'device {device!r} requested but CUDA is not available')
        if cuda_graphs and self.device.type != 'cuda':
            raise ParameterError('cuda_graphs=True needs a CUDA device, got '
                                 f'device={device!r}')
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        if self.bundle.random_init:
            log.warning('Pipeline runs %s: RANDOM-INITIALISED weights, outputs are meaningless',
                        self.bundle.name)
        if not self.bundle.tasks:
            raise ParameterError(f'bundle {self.bundle.name} has no detection or segmentation '
                                 'head (a backbone-only bundle: fine-tune it with `train`)')
        self.precision = precision
        self.score_threshold = float(score_threshold)
        self.nms_iou = float(nms_iou)
        self.max_detections = int(max_detections)
        self.model = self.bundle.build_model(self.device)
        if precision != 'fp32':
            # Linear / Conv weights in the autocast dtype once, not cast again on every frame.
            cast_autocast_weights(self.model, PRECISIONS[precision])
        if self.device.type == 'cuda':
            # The backbone hands the heads channels-last maps, so cuDNN runs their convs NHWC;
            # NCHW weights were transposed on every call (H100, CUDA graphs, det+seg 720p:
            # dense part 38.96 -> 36.23 ms at batch 4, bench/results/pipeline_heads_h100.json).
            for head in (self.model.detector, self.model.decode_head):
                if head is not None:
                    head.to(memory_format=torch.channels_last)
        self.tasks: tuple = self.bundle.tasks
        self.class_names: list = self.bundle.class_names
        self.class_colors: np.ndarray = self.bundle.class_colors
        self.bundle_hash: str = self.bundle.content_hash
        policy = self.bundle.input_policy
        self.input_policy = policy
        self._pad = int(policy['pad_multiple_px'])
        self._mean = torch.tensor(policy['mean'], device=self.device).view(1, 3, 1, 1)
        self._inv_std = 1.0 / torch.tensor(policy['std'], device=self.device).view(1, 3, 1, 1)
        self.compile = bool(compile)
        self.cuda_graphs = bool(cuda_graphs)
        if self.compile and compile_cache_dir:
            use_compile_cache(compile_cache_dir)
        if self.compile:
            # One compiled graph per input shape (frame size x batch size), all on the code
            # object of forward_dense, which every Pipeline in the process shares. Past dynamo's
            # default limit of 8 graphs per code object, new shapes would silently run eagerly
            # (seen: 4 camera configurations of 2 pipelines; a node warms batch sizes 1..n).
            dynamo_config = torch._dynamo.config
            dynamo_config.recompile_limit = max(dynamo_config.recompile_limit,
                                                COMPILED_SHAPES_LIMIT)
        self.compile_dynamic_batch = bool(compile_dynamic_batch)
        # dynamic=None: static shapes except the dimensions marked dynamic (_compiled_dense)
        # inner LayerNorm rows kept persistent on torch < 2.14 (inductor_choices)
        self._compiled_fn = (compile_inference(self.model.forward_dense,
                                               dynamic=None if self.compile_dynamic_batch
                                               else False, options=COMPILE_OPTIONS)
                             if self.compile else None)
        self._graphs: dict = {}
        self._mask_index: dict = {}

    # -- public API --------------------------------------------------------------------------
    def __call__(self, frames: Union[Frame, Sequence[Frame]]
                 ) -> Union[FrameResult, list[FrameResult]]:
        """One frame -> :class:`FrameResult`; a list of frames -> list of results, in order.

        Raises:
            InputError: a frame is not a uint8 (H, W, 3) image.
            NonFiniteOutputError: the model output NaN/Inf for some frames (see :meth:`run`).
        """
        if isinstance(frames, (list, tuple)):
            return self.run(frames)
        return self.run([frames])[0]

    def run(self, frames: Sequence[Frame]) -> list[FrameResult]:
        """Process several frames (any sizes), batching those with equal network input shape.

        A frame whose model output is not finite fails alone: every frame is processed, then
        :class:`NonFiniteOutputError` is raised naming each bad frame (its index in ``frames``)
        and output; its ``results`` holds the results of the good frames (``None`` at the bad
        ones). A frame's result does not depend on its batch, so the good ones are exactly what
        they would be alone.

        ``run(frames)`` is ``collect(submit(frames))``.
        """
        return self.collect(self._submit(frames, copy_graph_outputs=False))

    def submit(self, frames: Sequence[Frame]) -> 'PendingFrames':
        """Queue the frames' preprocessing and dense part on the device; return at once.

        On CUDA the work goes to the calling thread's current stream and this returns as soon
        as it is queued (a CUDA-graph replay or compiled forward: well before the GPU is done).
        :meth:`collect` finishes the frames, in this thread or another one, on that thread's
        current stream: a node can run the next frames' dense part on one stream while this
        batch's detection (host-bound: NMS, RoIAlign and their synchronisations) runs on another.

        Raises:
            InputError: a frame is not a uint8 (H, W, 3) image.
        """
        return self._submit(frames, copy_graph_outputs=True)

    def _submit(self, frames: Sequence[Frame], copy_graph_outputs: bool) -> 'PendingFrames':
        tensors = [validate_frame(f, i) for i, f in enumerate(frames)]
        geometry = []
        groups: dict = {}
        for i, t in enumerate(tensors):
            h, w = int(t.shape[0]), int(t.shape[1])
            rh, rw = resized_size(h, w, self.input_policy)
            geometry.append((h, w, rh, rw))
            groups.setdefault(padded_size(rh, rw, self._pad), []).append(i)
        batches = []
        with torch.inference_mode():
            for shape, indices in groups.items():
                batches.append(self._submit_batch([tensors[i] for i in indices],
                                                  [geometry[i] for i in indices], shape,
                                                  indices, copy_graph_outputs))
        return PendingFrames(len(tensors), batches)

    def collect(self, pending: 'PendingFrames') -> list[FrameResult]:
        """Finish frames queued by :meth:`submit`: detection, postprocess, copy to the host.

        Results, errors and their order are those of :meth:`run` for the same frames.

        Raises:
            NonFiniteOutputError: the model output NaN/Inf for some frames (see :meth:`run`).
        """
        results: list = [None] * pending.num_frames
        bad: dict = {}  # frame index -> names of its non-finite outputs
        with torch.inference_mode():
            for batch in pending.batches:
                out, bad_in_batch = self._collect_batch(batch)
                for i, r in zip(batch.indices, out, strict=True):
                    results[i] = r
                for j, names in bad_in_batch.items():
                    bad[batch.indices[j]] = names
        if bad:
            frames_text = '; '.join(f'frame {i} ({", ".join(names)})'
                                    for i, names in sorted(bad.items()))
            others = ("; the other frames' results are in the error's .results"
                      if len(bad) < len(results) else '')
            raise NonFiniteOutputError(
                f'model output contains NaN or Inf for {len(bad)} of {len(results)} frame(s): '
                f'{frames_text}. Broken weights or fp16 overflow? Those frames have no '
                f'result{others}', bad_frames=bad, results=results)
        return results

    def stage_streams(self) -> list:
        """Two CUDA streams for :meth:`submit` and :meth:`collect` in two threads; [] off CUDA.

        The collect stream has the higher priority: its small, serial kernels (NMS, RoIAlign,
        the box head) hold up the host and the frames' results, so the GPU schedules them ahead
        of the next frames' forward, which only needs throughput.
        """
        if self.device.type != 'cuda':
            return []
        return [torch.cuda.Stream(self.device), torch.cuda.Stream(self.device, priority=-1)]

    def warmup(self, sizes: Iterable[Sequence[int]], iterations: int = 2) -> None:
        """Run dummy frames of each size so that later calls pay no one-off costs.

        ``sizes`` holds ``(height, width)`` or ``(batch, height, width)`` items; this compiles
        and captures CUDA graphs for those shapes when enabled.
        """
        for size in sizes:
            batch, h, w = (1, *size) if len(size) == 2 else tuple(size)
            frames = [np.zeros((h, w, 3), np.uint8) for _ in range(batch)]
            for _ in range(iterations):
                self.run(frames)
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)

    def __repr__(self) -> str:
        return (f'Pipeline({self.bundle.name}, device={self.device}, precision={self.precision}, '
                f'tasks={self.tasks}, compile={self.compile}, cuda_graphs={self.cuda_graphs})')

    # -- stages ------------------------------------------------------------------------------
    def autocast(self):
        """Return the autocast context the model runs in (disabled for fp32).

        For fp16 / bf16 the model's Linear / Conv weights are stored in that dtype, so any
        direct call of ``self.model`` must run inside this context.
        """
        return torch.autocast(self.device.type, dtype=PRECISIONS[self.precision],
                              enabled=self.precision != 'fp32', cache_enabled=False)

    def _preprocess(self, frames: list[torch.Tensor], geometry: list, shape: tuple
                    ) -> torch.Tensor:
        batch = torch.zeros((len(frames), 3, *shape), device=self.device)
        for i, (frame, (h, w, rh, rw)) in enumerate(zip(frames, geometry, strict=True)):
            x = frame.to(self.device, non_blocking=True).permute(2, 0, 1)[None].float()
            if (rh, rw) != (h, w):
                x = F.interpolate(x, size=(rh, rw), mode='bilinear', align_corners=False)
            batch[i:i + 1, :, :rh, :rw] = (x - self._mean) * self._inv_std
        return batch

    def _compiled_dense(self, x: torch.Tensor) -> dict:
        if self.compile_dynamic_batch and x.shape[0] > 1:
            # A hint, not a constraint: dynamo compiles one graph with a symbolic batch size
            # (batch 1 stays specialised: dynamo's 0/1 specialisation).
            torch._dynamo.maybe_mark_dynamic(x, 0)
        return self._compiled_fn(x)

    def _dense(self, x: torch.Tensor, copy_graph_outputs: bool = False) -> dict:
        fn = self._compiled_dense if self._compiled_fn is not None else self.model.forward_dense
        if self.cuda_graphs:
            key = tuple(x.shape)
            if key not in self._graphs:
                self._graphs[key] = _CudaGraph(fn, x, self.autocast)
            return self._graphs[key](x, copy_graph_outputs)
        with self.autocast():
            return fn(x)

    def _finite_flags(self, dense: dict, candidates: Optional[list], batch: int
                      ) -> tuple[tuple[str, ...], torch.Tensor]:
        """Names of the model outputs and a (outputs, batch) bool tensor: all finite per frame.

        Only queues device work (no synchronisation): one ``isfinite().all()`` reduction per
        output tensor. Detection is judged on the RPN objectness and box deltas, which the dense
        part has checked per frame (``rpn_objectness_finite``, ``rpn_deltas_finite``: computed
        from every pyramid level, so NaN anywhere in the backbone/FPN shows there; absent from
        models without an RPN), and on the RoI head's candidate scores and boxes before the
        threshold, which would silently drop NaN scores.
        """
        def per_candidates(which: int) -> torch.Tensor:
            return torch.stack([torch.isfinite(c[which]).all() for c in candidates])

        names, flags = [], []
        if candidates is not None:
            names += ['detection scores', 'detection boxes']
            for rpn, which in (('rpn_objectness_finite', 1), ('rpn_deltas_finite', 0)):
                flag = per_candidates(which)
                flags.append(flag & dense[rpn] if rpn in dense else flag)
        if 'segmentation' in self.tasks:
            names.append('segmentation logits')
            flags.append(torch.isfinite(dense['seg_logits']).all(dim=(1, 2, 3)))
        return tuple(names), torch.stack(flags).reshape(len(names), batch)

    def _submit_batch(self, frames: list[torch.Tensor], geometry: list, shape: tuple,
                      indices: list, copy_graph_outputs: bool) -> '_PendingBatch':
        timer = _Timer(self.device)
        timer.mark()
        x = self._preprocess(frames, geometry, shape)
        timer.mark()
        dense = self._dense(x, copy_graph_outputs)
        timer.mark()
        stream = done = None
        if self.device.type == 'cuda':
            stream = torch.cuda.current_stream(self.device)
            done = torch.cuda.Event()
            done.record(stream)
        return _PendingBatch(indices, geometry, dense, timer, stream, done)

    def _collect_batch(self, batch: '_PendingBatch'
                       ) -> tuple[list[Optional[FrameResult]], dict]:
        """Results of one batch (``None`` for a non-finite frame) and {index: bad outputs}."""
        geometry, dense, timer = batch.geometry, batch.dense, batch.timer
        if batch.done is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(batch.done)
            if stream != batch.stream:
                # Allocated on the submitting stream, read here: their memory must not be
                # handed out again (to the next frames' forward) before this stream is done.
                for t in tree_leaves(dense):
                    if isinstance(t, torch.Tensor):
                        t.record_stream(stream)
        timer.mark()
        candidates = None
        if 'detection' in self.tasks:
            with self.autocast():
                candidates = self.model.detect(dense, [(g[2], g[3]) for g in geometry])
        timer.mark()
        outputs = []  # groups of one tensor per frame, copied to the host together
        if candidates is not None:
            selected = select_detections_batch(candidates, self.score_threshold, self.nms_iou,
                                               self.max_detections)
            outputs += [[d[0].float() for d in selected], [d[1].float() for d in selected],
                        [d[2].long() for d in selected]]
        if 'segmentation' in self.tasks:
            outputs.append(self._postprocess_masks(dense['seg_logits'], geometry))
        output_names, finite = self._finite_flags(dense, candidates, len(geometry))
        # The finiteness flags are computed on the device and read here, with the results'
        # copy to the host, after all the postprocess work is queued: that copy synchronises
        # anyway, so the check adds a few tiny kernels and a few bytes, not a wait.
        # Reading them right after the forward (``bool(...)``) would stall the host before the
        # postprocess is queued. A bad frame's postprocess runs on garbage (harmless: argmax and
        # the threshold take NaN) and its result is dropped.
        host = iter(tensors_to_host([[finite], *outputs], self.device))
        finite_host = next(host)[0]
        dets_host = masks_host = None
        if candidates is not None:  # (boxes, scores, class_ids) per frame
            dets_host = list(zip(next(host), next(host), next(host), strict=True))
        if 'segmentation' in self.tasks:
            masks_host = next(host)
        timer.mark()
        times = timer.times()
        results: list = []
        bad = {}
        for i, (h, w, _, _) in enumerate(geometry):
            if not bool(finite_host[:, i].all()):
                bad[i] = [n for n, ok in zip(output_names, finite_host[:, i].tolist(),
                                             strict=True) if not ok]
                results.append(None)
                continue
            detections = None
            if dets_host is not None:
                boxes, scores, ids = dets_host[i]
                detections = Detections(self._boxes_to_source(boxes.numpy(), geometry[i]),
                                        scores.numpy(), ids.numpy())
            mask = masks_host[i].numpy() if masks_host is not None else None
            results.append(FrameResult(h, w, detections, mask, StageTimes(**vars(times))))
        return results, bad

    @staticmethod
    def _boxes_to_source(boxes: np.ndarray, geometry: tuple) -> np.ndarray:
        """Map float32 boxes from network-input to source pixels, clamped to the frame (host).

        On the host, after the batch's one copy, it launches nothing (on the device: seven small
        ops per frame); float32 arithmetic as torch's on the device, so the same numbers.
        """
        h, w, rh, rw = geometry
        out = np.empty_like(boxes)
        out[:, 0::2] = np.clip(boxes[:, 0::2] * np.float32(w / rw), 0, w)
        out[:, 1::2] = np.clip(boxes[:, 1::2] * np.float32(h / rh), 0, h)
        return out

    def _postprocess_masks(self, logits: torch.Tensor, geometry: list) -> list[torch.Tensor]:
        """Class ids (H, W) uint8 per frame: argmax at stride 4, nearest at source pixels."""
        labels = logits.argmax(dim=1).to(torch.uint8)  # (B, H/4, W/4)
        out = []
        for i, g in enumerate(geometry):
            rows, cols = self._mask_indices(g, labels.shape[-2:])
            out.append(labels[i].index_select(0, rows).index_select(1, cols))
        return out

    def _mask_indices(self, geometry: tuple, grid: Sequence[int]
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Row / column of the stride-4 grid nearest to each source pixel's centre."""
        key = (*geometry, *grid)
        if key not in self._mask_index:
            h, w, rh, rw = geometry
            stride = 4

            def index(n_src: int, n_net: int, n_grid: int) -> torch.Tensor:
                centres = (np.arange(n_src, dtype=np.float64) + 0.5) * (n_net / n_src)
                idx = np.clip(np.floor(centres / stride), 0, n_grid - 1).astype(np.int64)
                return torch.from_numpy(idx).to(self.device)

            self._mask_index[key] = (index(h, rh, int(grid[0])), index(w, rw, int(grid[1])))
        return self._mask_index[key]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run a bundle on image files and print one JSON line per image (no ROS needed)."""
    import argparse
    import json

    import cv2

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument('bundle', help='bundle file (.safetensors)')
    parser.add_argument('images', nargs='+', help='image files (any format OpenCV reads)')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--precision', default='fp32', choices=sorted(PRECISIONS))
    parser.add_argument('--score-threshold', type=float, default=0.3)
    args = parser.parse_args(argv)
    pipe = Pipeline(args.bundle, device=args.device, precision=args.precision,
                    score_threshold=args.score_threshold)
    for path in args.images:
        bgr = cv2.imread(path, cv2.IMREAD_COLOR)
        if bgr is None:
            raise InputError(f'{path}: cannot be read as an image')
        result = pipe(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
        out = {'image': path, 'height_px': result.height_px, 'width_px': result.width_px,
               'times': result.times.as_dict()}
        if result.detections is not None:
            d = result.detections
            out['detections'] = [
                {'class': pipe.class_names[c], 'score': round(float(s), 4),
                 'box_xyxy_px': [round(float(v), 1) for v in b]}
                for b, s, c in zip(d.boxes_xyxy_px, d.scores, d.class_ids, strict=True)]
        if result.class_mask is not None:
            ids, counts = np.unique(result.class_mask, return_counts=True)
            out['mask_fraction'] = {pipe.class_names[i]: round(c / result.class_mask.size, 4)
                                    for i, c in zip(ids, counts, strict=True)}
        print(json.dumps(out))
    return 0
