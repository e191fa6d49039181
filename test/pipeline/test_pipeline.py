"""Pipeline on CPU: geometry, batching, NMS, input validation, output types."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mamba_perception.errors import InputError, ParameterError
from mamba_perception.models.bundle import create_random_bundle
from mamba_perception.pipeline import (
    Pipeline,
    padded_size,
    resized_size,
    select_detections,
    select_detections_batch,
    tensors_to_host,
)
from mamba_perception.results import Detections, FrameResult, StageTimes


def random_frame(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def check_result(result, h, w, num_classes=3, max_detections=100):
    assert isinstance(result, FrameResult)
    assert (result.height_px, result.width_px) == (h, w)
    d = result.detections
    assert isinstance(d, Detections)
    n = len(d)
    assert n <= max_detections
    assert d.boxes_xyxy_px.shape == (n, 4) and d.boxes_xyxy_px.dtype == np.float32
    assert d.scores.shape == (n,) and d.scores.dtype == np.float32
    assert d.class_ids.shape == (n,) and d.class_ids.dtype == np.int64
    if n:
        b = d.boxes_xyxy_px
        assert (b[:, 0] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 1] >= 0).all()
        assert (b[:, 3] <= h).all() and (b[:, 2] >= b[:, 0]).all() and (b[:, 3] >= b[:, 1]).all()
        assert (np.diff(d.scores) <= 0).all()  # sorted by decreasing score
        assert d.class_ids.min() >= 0 and d.class_ids.max() < num_classes
    m = result.class_mask
    assert m.shape == (h, w) and m.dtype == np.uint8 and m.max() < num_classes
    assert isinstance(result.times, StageTimes)
    assert result.times.preprocess_ms > 0 and result.times.inference_ms > 0
    assert result.times.postprocess_ms > 0 and result.times.decode_ms == 0


# -- pure helpers -----------------------------------------------------------------------------

def test_resize_policy():
    policy = {'max_long_side_px': 1333, 'max_short_side_px': 800, 'allow_upscale': False}
    assert resized_size(720, 1280, policy) == (720, 1280)  # never upscaled
    assert resized_size(1080, 1920, policy) == (750, 1333)  # long side limits
    assert resized_size(2000, 2000, policy) == (800, 800)  # short side limits
    assert resized_size(600, 1000, {**policy, 'allow_upscale': True}) == (800, 1333)
    assert resized_size(3, 5, {'max_long_side_px': None, 'max_short_side_px': None}) == (3, 5)
    assert padded_size(720, 1280) == (736, 1280)
    assert padded_size(1, 33) == (32, 64)


def test_select_detections_nms_per_class():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 0, 11, 10], [0, 0, 10, 10], [50, 50, 60, 60],
                          [20, 20, 20.001, 30], [70, 70, 80, 80]], dtype=torch.float32)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.95, 0.3])
    ids = torch.tensor([0, 0, 1, 0, 0, 2])
    b, s, c = select_detections(boxes, scores, ids, score_threshold=0.3, nms_iou=0.5,
                                max_detections=100)
    # box 1 overlaps box 0 (IoU 0.82, same class): suppressed; box 2 is the same box as box 0
    # but another class: kept; box 4 is degenerate; box 5 is not above the threshold.
    assert s.tolist() == pytest.approx([0.9, 0.7, 0.6])
    assert c.tolist() == [0, 1, 0]
    assert torch.equal(b[1], boxes[2])
    # A higher IoU threshold keeps the overlapping box.
    _, s, _ = select_detections(boxes, scores, ids, 0.3, 0.9, 100)
    assert s.tolist() == pytest.approx([0.9, 0.8, 0.7, 0.6])
    # max_detections keeps the best ones.
    _, s, _ = select_detections(boxes, scores, ids, 0.0, 0.5, 2)
    assert s.tolist() == pytest.approx([0.9, 0.7])
    # Nothing above the threshold: empty, with the right shapes.
    b, s, c = select_detections(boxes, scores, ids, 0.99, 0.5, 10)
    assert b.shape == (0, 4) and s.shape == (0,) and c.shape == (0,)


def test_select_detections_batch_equals_each_frame_alone():
    """Several frames at once give each frame's torchvision threshold + batched_nms + top-k."""
    from torchvision.ops import batched_nms, remove_small_boxes
    torch.manual_seed(0)
    frames = []
    for n in (300, 0, 1, 120):
        xy = torch.rand(n, 2) * 200
        wh = torch.rand(n, 2) * 60
        wh[::17] = 0.0  # degenerate boxes
        frames.append((torch.cat([xy, xy + wh], 1), torch.rand(n), torch.randint(0, 5, (n,))))
    frames[2] = (torch.tensor([[10.0, 10.0, 50.0, 50.0]]), torch.tensor([0.9]), torch.tensor([3]))
    got = select_detections_batch(frames, 0.4, 0.5, 25)
    assert len(got) == len(frames)
    for (boxes, scores, ids), (b, s, c) in zip(frames, got, strict=True):
        keep = scores > 0.4
        boxes, scores, ids = boxes[keep], scores[keep], ids[keep]
        keep = remove_small_boxes(boxes, 1e-2)
        boxes, scores, ids = boxes[keep], scores[keep], ids[keep]
        keep = batched_nms(boxes, scores, ids, 0.5)[:25]
        assert torch.equal(b, boxes[keep]) and torch.equal(s, scores[keep])
        assert torch.equal(c, ids[keep])
    assert [len(s) for _, s, _ in got] == [25, 0, 1, 25]  # the cap, empty and single frames


def host_copy_groups(device):
    return [[torch.arange(6.0, device=device).view(2, 3), torch.zeros(0, 3, device=device),
             torch.full((1, 3), 7.0, device=device)],
            [torch.tensor([[True, False], [False, True]], device=device)],
            [torch.arange(6, device=device).view(2, 3).t()]]  # not contiguous


@pytest.mark.parametrize('device', [
    'cpu',
    pytest.param('cuda', marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason='needs CUDA')])])
def test_tensors_to_host_keeps_shapes_and_values(device):
    groups = host_copy_groups(device)
    host = tensors_to_host(groups, torch.device(device))
    assert [len(h) for h in host] == [3, 1, 1]
    for got_group, want_group in zip(host, groups, strict=True):
        for got, want in zip(got_group, want_group, strict=True):
            assert got.device.type == 'cpu' and got.dtype == want.dtype
            assert torch.equal(got, want.cpu())
            if device == 'cuda':
                assert got.is_pinned()


# -- geometry: boxes and masks land exactly on source pixels ----------------------------------

class BrightRectangleOracle(torch.nn.Module):
    """Stands in for the network: 'detects' the bright pixels of the preprocessed input.

    Its box is the pixel-edge bounding box of bright input pixels (padded-input coordinates);
    its class map marks stride-4 cells that are mostly bright. The pipeline must map both
    back to the rectangle drawn in the source frame.
    """

    def forward_dense(self, x):
        bright = x[:, 0] > 1.0  # normalised 255 is about 2.2, 0 about -2.1, padding 0
        cells = F.avg_pool2d(bright[:, None].float(), 4)[:, 0] > 0.5
        logits = torch.stack([~cells, cells], dim=1).float()
        return {'bright': bright, 'seg_logits': logits}

    def detect(self, dense, image_sizes):
        out = []
        for bright in dense['bright']:
            ys, xs = torch.nonzero(bright, as_tuple=True)
            box = torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()
            out.append((box[None], torch.tensor([0.9]), torch.tensor([1])))
        return out


def frame_with_rectangle(h, w, x1, y1, x2, y2):
    frame = np.zeros((h, w, 3), np.uint8)
    frame[y1:y2, x1:x2] = 255
    return frame


def test_boxes_and_mask_map_back_to_source_pixels_exactly():
    bundle = create_random_bundle(
        num_classes=2, input_policy={'max_long_side_px': 500, 'max_short_side_px': None})
    pipe = Pipeline(bundle, score_threshold=0.5)
    pipe.model = BrightRectangleOracle()
    cases = [
        # (frame size, rectangle): 1000x600 is scaled by 0.5 to 500x300 (padded 512x320);
        # 490x290 -> 490x290 (no upscaling), padded 512x320 too: both run in one batch;
        # 320x200 -> itself, padded 320x224: a second batch.
        ((600, 1000), (96, 64, 304, 200)),
        ((290, 490), (33, 17, 301, 250)),
        ((200, 320), (0, 0, 41, 13)),
    ]
    frames = [frame_with_rectangle(h, w, *rect) for (h, w), rect in cases]
    results = pipe(frames)
    for ((h, w), (x1, y1, x2, y2)), result in zip(cases, results, strict=True):
        assert (result.height_px, result.width_px) == (h, w)
        np.testing.assert_array_equal(result.detections.boxes_xyxy_px, [[x1, y1, x2, y2]])
        assert result.detections.class_ids.tolist() == [1]
    # The stride-4 class map lands on the rectangle exactly where the geometry is cell-aligned
    # (first case: source edges on multiples of 8 = 4 cells x scale 2).
    expected = np.zeros((600, 1000), np.uint8)
    expected[64:200, 96:304] = 1
    np.testing.assert_array_equal(results[0].class_mask, expected)
    # Elsewhere it is within half a cell (2 px at scale 1) of the rectangle.
    mask = results[1].class_mask
    ys, xs = np.nonzero(mask)
    assert abs(xs.min() - 33) <= 2 and abs(xs.max() + 1 - 301) <= 2
    assert abs(ys.min() - 17) <= 2 and abs(ys.max() + 1 - 250) <= 2


# -- the real (random) network --------------------------------------------------------------

def test_single_frame_outputs(pipeline):
    result = pipeline(random_frame(120, 200))
    check_result(result, 120, 200)
    assert pipeline.tasks == ('detection', 'segmentation')
    assert pipeline.class_names == ['class_0', 'class_1', 'class_2']
    assert pipeline.class_colors.shape == (3, 3) and pipeline.class_colors.dtype == np.uint8
    assert pipeline.bundle_hash.startswith('sha256:')
    assert pipeline.device == torch.device('cpu') and pipeline.precision == 'fp32'


def test_torch_and_noncontiguous_inputs(pipeline):
    frame = random_frame(64, 96, seed=1)
    a = pipeline(frame)
    b = pipeline(torch.from_numpy(frame))
    c = pipeline(np.ascontiguousarray(frame[..., ::-1])[..., ::-1])  # negative strides
    for other in (b, c):
        np.testing.assert_allclose(a.detections.boxes_xyxy_px, other.detections.boxes_xyxy_px)
        np.testing.assert_array_equal(a.class_mask, other.class_mask)


def test_batch_of_different_sizes_equals_one_by_one(pipeline):
    # 300x400 is resized to 192x256; 70x140 is padded to 96x160 as the first and third are:
    # frames of two sizes in one batch, each one's boxes clipped to its own size
    sizes = [(96, 160), (100, 150), (96, 160), (300, 400), (70, 140)]
    frames = [random_frame(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    batched = pipeline(frames)
    assert isinstance(batched, list) and len(batched) == len(frames)
    for frame, (h, w), result in zip(frames, sizes, batched, strict=True):
        check_result(result, h, w)
        alone = pipeline(frame)
        np.testing.assert_allclose(result.detections.scores, alone.detections.scores,
                                   rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(result.detections.boxes_xyxy_px,
                                   alone.detections.boxes_xyxy_px, rtol=1e-4, atol=1e-2)
        assert (result.class_mask == alone.class_mask).mean() > 0.999


def test_thresholds_are_applied():
    from mamba_perception.pipeline import Pipeline as P
    bundle = create_random_bundle(num_classes=3)
    frame = random_frame(96, 128, seed=5)
    loose = P(bundle, score_threshold=0.0, max_detections=7)(frame)
    assert len(loose.detections) == 7
    strict = P(bundle, score_threshold=0.34)(frame)
    assert (strict.detections.scores > 0.34).all()


@pytest.mark.parametrize('tasks', [('detection',), ('segmentation',)])
def test_single_task_bundles(tasks):
    pipe = Pipeline(create_random_bundle(tasks=tasks, num_classes=4), score_threshold=0.0)
    result = pipe(random_frame(64, 64))
    assert pipe.tasks == tasks
    assert (result.detections is None) == ('detection' not in tasks)
    assert (result.class_mask is None) == ('segmentation' not in tasks)


def test_bf16_autocast_on_cpu(pipeline, bundle_path):
    pipe = Pipeline(bundle_path, precision='bf16', score_threshold=0.0)
    result = pipe(random_frame(64, 96))
    check_result(result, 64, 96)
    assert pipe.precision == 'bf16'
    # GEMM / conv weights stored in bf16 once (not cast by autocast per frame); norms fp32
    dtypes = {n: p.dtype for n, p in pipe.model.named_parameters()}
    assert dtypes['backbone.layers.0.blocks.0.mlp.fc1.weight'] == torch.bfloat16
    assert dtypes['backbone.layers.0.blocks.0.norm.weight'] == torch.float32


def test_compile_allows_more_input_shapes_than_dynamo_default(bundle_path):
    # Each (frame size, batch size) is a compiled graph of the one shared forward_dense code
    # object: at dynamo's default limit (8) a node with several cameras and sizes would fall
    # back to eager without a word. Building the pipeline compiles nothing yet (lazy).
    from mamba_perception.pipeline import COMPILED_SHAPES_LIMIT

    # config.patch, not monkeypatch: monkeypatch's undo left torch 2.14's config entry
    # hidden ("recompile_limit does not exist") for every later compile in the process
    with torch._dynamo.config.patch(recompile_limit=8):
        Pipeline(bundle_path, compile=False)
        assert torch._dynamo.config.recompile_limit == 8
        Pipeline(bundle_path, compile=True)
        assert torch._dynamo.config.recompile_limit == COMPILED_SHAPES_LIMIT >= 32


def test_pipeline_compiles_with_its_options(bundle_path, monkeypatch):
    from mamba_perception.pipeline import COMPILE_OPTIONS

    calls = []
    monkeypatch.setattr(torch, 'compile', lambda fn, **kwargs: calls.append(kwargs) or fn)
    Pipeline(bundle_path, compile=True)
    assert [c['options'] for c in calls] == [COMPILE_OPTIONS]


def test_compile_options_stop_inductor_writing_over_inputs():
    """What COMPILE_OPTIONS is for: without it inductor writes the LayerNorm's output over a
    buffer that dies there (an in/out argument, which its autotuner times with a copy of that
    buffer restored inside every timed call); with it, every output is a new buffer."""
    from torch._inductor.utils import run_and_get_code

    from mamba_perception.pipeline import COMPILE_OPTIONS

    weight, bias, eye = torch.randn(96), torch.randn(96), torch.eye(96)

    def norm_after_matmul(x):  # the matmul's output dies in the norm, as the scan's in SS2D
        return F.layer_norm(torch.mm(torch.sin(x), eye), (96,), weight, bias)

    x = torch.randn(64, 96)
    sources = {}
    for name, options in (('default', {}), ('ours', COMPILE_OPTIONS)):
        torch._dynamo.reset()
        out, code = run_and_get_code(torch.compile(norm_after_matmul, options=options), x)
        torch.testing.assert_close(out, norm_after_matmul(x), rtol=1e-4, atol=1e-4)
        sources[name] = '\n'.join(code)
    torch._dynamo.reset()
    assert 'in_out_ptr' in sources['default']
    assert 'in_out_ptr' not in sources['ours']


def test_warmup_accepts_sizes(pipeline):
    pipeline.warmup([(64, 64), (2, 64, 96)], iterations=1)


@pytest.mark.parametrize('frame, message', [
    (np.zeros((64, 64, 3), np.float32), 'frame 0: dtype float32, expected uint8'),
    (np.full((8, 8, 3), np.nan, np.float32), 'frame 0: contains NaN'),
    (np.zeros((64, 64), np.uint8), r'frame 0: shape \(64, 64\), expected \(height, width, 3\)'),
    (np.zeros((64, 64, 4), np.uint8), r'shape \(64, 64, 4\)'),
    (np.zeros((0, 0, 3), np.uint8), r'frame 0: empty frame \(0x0 pixels\)'),
    (torch.zeros(3, 64, 64, dtype=torch.uint8), r'shape \(3, 64, 64\)'),
    ([[1, 2, 3]], 'expected a numpy array or torch tensor'),
])
def test_invalid_frames_raise_input_error(pipeline, frame, message):
    with pytest.raises(InputError, match=message):
        pipeline(frame)


def test_invalid_frame_in_a_batch_is_named(pipeline):
    with pytest.raises(InputError, match='frame 1: empty frame'):
        pipeline([random_frame(32, 32), np.zeros((0, 5, 3), np.uint8)])
    assert issubclass(InputError, ValueError)


@pytest.mark.parametrize('kwargs, message', [
    ({'precision': 'fp8'}, 'precision'),
    ({'score_threshold': 1.5}, 'score_threshold'),
    ({'nms_iou': 0.0}, 'nms_iou'),
    ({'max_detections': 0}, 'max_detections'),
    ({'cuda_graphs': True}, 'cuda_graphs=True needs a CUDA device'),
])
def test_invalid_parameters(bundle_path, kwargs, message):
    with pytest.raises(ParameterError, match=message):
        Pipeline(bundle_path, **kwargs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
@pytest.mark.parametrize('precision', ['fp16', 'bf16'])
def test_cuda_matches_cpu_and_graphs(bundle_path, precision):
    cpu = Pipeline(bundle_path, score_threshold=0.0)
    gpu = Pipeline(bundle_path, device='cuda', precision=precision, score_threshold=0.0)
    graphs = Pipeline(bundle_path, device='cuda', precision=precision, score_threshold=0.0,
                      cuda_graphs=True)
    frame = random_frame(96, 128)
    a, b, c = cpu(frame), gpu(frame), graphs(frame)
    check_result(b, 96, 128)
    assert (a.class_mask == b.class_mask).mean() > 0.95
    np.testing.assert_allclose(b.detections.scores, c.detections.scores, atol=1e-3)


def test_vim_backbone_pipeline():
    pipe = Pipeline(create_random_bundle(backbone='vim_test', num_classes=3), score_threshold=0.0)
    results = pipe([random_frame(96, 128), random_frame(70, 50, seed=2)])
    check_result(results[0], 96, 128)
    check_result(results[1], 70, 50)


def _same_results(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert (x.height_px, x.width_px) == (y.height_px, y.width_px)
        np.testing.assert_array_equal(x.class_mask, y.class_mask)
        np.testing.assert_array_equal(x.detections.boxes_xyxy_px, y.detections.boxes_xyxy_px)
        np.testing.assert_array_equal(x.detections.scores, y.detections.scores)
        np.testing.assert_array_equal(x.detections.class_ids, y.detections.class_ids)


def test_submit_collect_in_another_thread_equals_run(bundle_path):
    """Two batches queued before either is collected, collected in another thread, in order."""
    import threading
    pipe = Pipeline(bundle_path, score_threshold=0.0)
    assert pipe.stage_streams() == []  # CPU: no streams, both threads just run
    first = [random_frame(96, 128, seed=3), random_frame(70, 50, seed=4)]
    second = [random_frame(96, 128, seed=5)]
    expected = [pipe.run(first), pipe.run(second)]
    pending = [pipe.submit(first), pipe.submit(second)]
    assert [len(p) for p in pending] == [2, 1]
    collected = []
    worker = threading.Thread(target=lambda: collected.extend(pipe.collect(p) for p in pending))
    worker.start()
    worker.join(60)
    _same_results(collected[0], expected[0])
    _same_results(collected[1], expected[1])
    for result in collected[0]:
        check_result(result, result.height_px, result.width_px)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
@pytest.mark.parametrize('cuda_graphs', [False, True])
def test_cuda_submit_and_collect_on_two_streams(bundle_path, cuda_graphs):
    """Submit on one stream and thread, collect on another: the next frames' forward (a graph
    replay writes the same buffers) must not change a batch that is not collected yet."""
    import threading
    pipe = Pipeline(bundle_path, device='cuda', precision='fp16', score_threshold=0.0,
                    cuda_graphs=cuda_graphs)
    batches = [[random_frame(96, 128, seed=10 + k)] for k in range(4)]
    expected = [pipe.run(b) for b in batches]
    submit_stream, collect_stream = pipe.stage_streams()
    assert collect_stream.priority < submit_stream.priority  # collect's kernels go first
    with torch.cuda.stream(submit_stream):
        pending = [pipe.submit(b) for b in batches]  # all queued before any is collected
    collected = []

    def collect_all():
        with torch.cuda.stream(collect_stream):
            collected.extend(pipe.collect(p) for p in pending)

    worker = threading.Thread(target=collect_all)
    worker.start()
    worker.join(120)
    for got, want in zip(collected, expected, strict=True):
        _same_results(got, want)


def test_read_only_frames_are_shared_without_a_warning():
    """A frame viewing a received message's bytes (read-only) is used in place, silently.

    In a fresh process: torch warns about non-writable arrays once per process, so an earlier
    test could hide the warning here.
    """
    import os
    import subprocess
    import sys
    code = ('import numpy as np\n'
            'from mamba_perception.pipeline import validate_frame\n'
            'a = np.frombuffer(bytes(range(36)), np.uint8).reshape(3, 4, 3)\n'
            'assert not a.flags.writeable\n'
            't = validate_frame(a)\n'
            'assert t.data_ptr() == a.ctypes.data and t[2, 3, 2] == 35\n')
    subprocess.run([sys.executable, '-W', 'error', '-c', code], check=True, env=dict(os.environ),
                   timeout=120)
