"""End-to-end ``Pipeline`` latency: VMamba-T det / seg / det+seg, 720p and 1080p, 1 and 4 cameras.

One question: how long does ``pipeline(frames)`` take, from host uint8 frames to host results,
including upload, preprocessing, inference, NMS and the copy back? Timing: ``perf_counter``
around each call (the call ends with the device-to-host copy, i.e. synchronised), after warm-up;
the per-stage split comes from the pipeline's own CUDA-event ``StageTimes``. Peak memory is
``torch.cuda.max_memory_allocated`` per configuration.

Weights are random (``create_random_bundle`` with the official head sizes): speed does not
depend on the values except through the number of boxes reaching NMS, which the RPN fixes at
1000 proposals per image. Writes one JSON with provenance; configurations run in priority order
until ``--budget-s`` is spent (the rest are listed as skipped).

    python bench/pipeline_speed.py --out bench/results/pipeline_h100.json
"""

import argparse
import datetime
import gc
import json
import os
import platform
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import PERCEPTION_TASKS as TASKS  # noqa: E402
from common import add_coarse_fusion_option, apply_coarse_fusion_option, wall_ms  # noqa: E402

SIZES = {'720p': (720, 1280), '1080p': (1080, 1920)}


MODES = ('eager', 'cuda_graphs', 'compile_graphs')  # compile_graphs: torch.compile + CUDA graph


def configs(quick: bool, modes=('eager', 'cuda_graphs'), batches=(1, 4)) -> list:
    """Benchmark configurations, most important first."""
    out = []
    # the target first: VMamba-T det+seg 720p batch 1
    for prec in ('fp16', 'bf16'):
        for mode in modes:
            out.append(('detseg', '720p', 1, prec, mode))
    for task in ('det', 'seg', 'detseg'):
        for size in ('720p', '1080p'):
            for batch in batches:
                for mode in modes:
                    cfg = (task, size, batch, 'fp16', mode)
                    if cfg not in out:
                        out.append(cfg)
    for task in ('det', 'seg'):  # bf16 beside fp16 where it matters most: fast modes, 720p
        for mode in modes:
            if mode != 'eager':
                out.append((task, '720p', 1, 'bf16', mode))
    return out[:len(modes) * 2] if quick else out


def select(cfgs: list, args) -> list:
    """Keep the configurations matching every given --tasks/--sizes/... filter."""
    keep = []
    for task, size, batch, prec, mode in cfgs:
        if ((args.tasks and task not in args.tasks) or (args.sizes and size not in args.sizes)
                or (args.batches and batch not in args.batches)
                or (args.precisions and prec not in args.precisions)):
            continue
        keep.append((task, size, batch, prec, mode))
    return keep


def percentile(values, q):
    return float(np.percentile(np.asarray(values), q))


_PIPELINES: dict = {}


HEAD_LAYOUT = {'layout': 'default'}  # --head-layout, read by get_pipeline
COMPILE_OPTIONS = {'compile_dynamic_batch': False}  # --compile-dynamic-batch


def get_pipeline(bundles, task, precision, mode):
    """One Pipeline (one model build) per task / precision / mode, reused across sizes."""
    from mamba_perception.pipeline import Pipeline
    key = (task, precision, mode)
    if key not in _PIPELINES:
        pipe = Pipeline(bundles[task], device='cuda', precision=precision,
                        cuda_graphs=mode in ('cuda_graphs', 'compile_graphs'),
                        compile=mode == 'compile_graphs', **COMPILE_OPTIONS)
        if HEAD_LAYOUT['layout'] != 'default':  # experiment: head conv weights' memory format
            fmt = {'channels_last': torch.channels_last,
                   'contiguous': torch.contiguous_format}[HEAD_LAYOUT['layout']]
            for head in (pipe.model.detector, pipe.model.decode_head):
                if head is not None:
                    head.to(memory_format=fmt)
        _PIPELINES[key] = pipe
    return _PIPELINES[key]


def run_one(bundles, task, size, batch, precision, mode, frames_min, warmup, gc_freeze=False):
    h, w = SIZES[size]
    pipe = get_pipeline(bundles, task, precision, mode)
    pipe._graphs.clear()  # drop graphs (and their memory pools) of earlier shapes
    torch.cuda.empty_cache()
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(batch)]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(warmup):
        pipe(frames)
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - t0
    if gc_freeze:  # what a latency-critical process can do after warm-up: no old-object scans
        gc.collect()
        gc.freeze()
    calls = -(-frames_min // batch)
    latency, stages, dets = [], {'preprocess_ms': [], 'inference_ms': [],
                                 'postprocess_ms': []}, []
    for _ in range(calls):
        t = time.perf_counter()
        results = pipe(frames)
        latency.append((time.perf_counter() - t) * 1e3)
        for k in stages:
            stages[k].append(getattr(results[0].times, k))
        if results[0].detections is not None:
            dets.append(len(results[0].detections))
    from mamba_perception.pipeline import padded_size, resized_size
    rh, rw = resized_size(h, w, pipe.input_policy)
    split = dense_sparse_split(pipe, frames, repeats=50)
    return {
        'task': task, 'tasks': list(TASKS[task]), 'frame_size_hw': [h, w],
        'network_input_hw': list(padded_size(rh, rw)), 'batch_cameras': batch,
        'precision': precision, 'mode': mode, 'calls': calls, 'frames': calls * batch,
        'latency_ms_p50': percentile(latency, 50), 'latency_ms_p99': percentile(latency, 99),
        'latency_ms_mean': float(np.mean(latency)),
        'per_frame_ms_p50': percentile(latency, 50) / batch,
        'throughput_fps': 1e3 * batch / float(np.mean(latency)),
        'stage_ms_p50': {k: percentile(v, 50) for k, v in stages.items()},
        'peak_memory_mib': torch.cuda.max_memory_allocated() / 2 ** 20,
        'warmup_calls': warmup, 'warmup_s': warmup_s,
        'detections_per_frame_mean': float(np.mean(dets)) if dets else None,
        'inference_split_ms_p50': split, 'gc_freeze': gc_freeze,
    }


def dense_sparse_split(pipe, frames, repeats):
    """p50 device time of the inference stage's two parts, from CUDA events around each.

    ``dense``: backbone + FPN + RPN head + UperNet (the part that is compiled / graph-captured);
    ``sparse``: ``model.detect`` (RPN proposal filtering and NMS, RoIAlign, box head), eager
    with host synchronisations inside torchvision. Runs the pipeline's own stage methods
    (private API: a benchmark may look inside) on already-uploaded frames.
    """
    from mamba_perception.pipeline import padded_size, resized_size, validate_frame
    tensors = [validate_frame(f, i).cuda() for i, f in enumerate(frames)]
    geometry = []
    for t in tensors:
        h, w = int(t.shape[0]), int(t.shape[1])
        geometry.append((h, w, *resized_size(h, w, pipe.input_policy)))
    shape = padded_size(*geometry[0][2:], pipe._pad)
    dense_ms, sparse_ms = [], []
    with torch.inference_mode():
        for _ in range(repeats):
            x = pipe._preprocess(tensors, geometry, shape)
            marks = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            marks[0].record()
            dense = pipe._dense(x)
            marks[1].record()
            if 'detection' in pipe.tasks:
                with pipe.autocast():
                    pipe.model.detect(dense, [(g[2], g[3]) for g in geometry])
            marks[2].record()
            marks[2].synchronize()
            dense_ms.append(marks[0].elapsed_time(marks[1]))
            sparse_ms.append(marks[1].elapsed_time(marks[2]))
    return {'dense': percentile(dense_ms, 50), 'sparse_detect': percentile(sparse_ms, 50),
            'repeats': repeats}


def profile_table(bundles, cfg, out_path, calls=30):
    """torch.profiler table (top ops by device and by host time) of one configuration."""
    from torch.profiler import ProfilerActivity, profile
    task, size, batch, precision, mode = cfg
    h, w = SIZES[size]
    pipe = get_pipeline(bundles, task, precision, mode)
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(batch)]
    for _ in range(5):
        pipe(frames)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            pipe(frames)
        torch.cuda.synchronize()
    table = prof.key_averages()
    with open(out_path, 'w') as f:
        f.write(f'# {cfg}, {calls} calls, torch.profiler\n')
        f.write(table.table(sort_by='cuda_time_total', row_limit=40, max_name_column_width=70))
        f.write('\n')
        f.write(table.table(sort_by='cpu_time_total', row_limit=40, max_name_column_width=70))


def profile_sparse(bundles, cfg, out_path, calls=20):
    """torch.profiler tables of ``model.detect`` alone (the eager sparse part) for one config.

    The file's first line also gives the synchronised wall time per call (p50 and min).
    """
    from torch.profiler import ProfilerActivity, profile

    from mamba_perception.pipeline import padded_size, resized_size, validate_frame
    task, size, batch, precision, mode = cfg
    h, w = SIZES[size]
    pipe = get_pipeline(bundles, task, precision, mode)
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(batch)]
    tensors = [validate_frame(f, i).cuda() for i, f in enumerate(frames)]
    geometry = [(h, w, *resized_size(h, w, pipe.input_policy)) for _ in tensors]
    shape = padded_size(*geometry[0][2:], pipe._pad)
    sizes = [(g[2], g[3]) for g in geometry]
    with torch.inference_mode():
        x = pipe._preprocess(tensors, geometry, shape)
        dense = pipe._dense(x)

        def detect():
            with pipe.autocast():
                return pipe.model.detect(dense, sizes)

        wall = wall_ms(detect, iters=calls, warmup=5)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                detect()
            torch.cuda.synchronize()
    table = prof.key_averages()
    with open(out_path, 'w') as f:
        f.write(f'# model.detect only, {cfg}, {calls} calls, torch.profiler; synchronised wall '
                f'per call p50 {percentile(wall, 50):.2f} ms, min {min(wall):.2f} ms\n')
        f.write(table.table(sort_by='cuda_time_total', row_limit=30, max_name_column_width=70))
        f.write('\n')
        f.write(table.table(sort_by='cpu_time_total', row_limit=40, max_name_column_width=70))
    print(f'{cfg}: detect wall p50 {percentile(wall, 50):.2f} ms -> {out_path}', flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', required=True)
    parser.add_argument('--frames', type=int, default=500, help='timed frames per config')
    parser.add_argument('--warmup', type=int, default=20, help='untimed calls per config')
    parser.add_argument('--budget-s', type=float, default=240.0)
    parser.add_argument('--quick', action='store_true', help='first configurations only')
    parser.add_argument('--modes', nargs='+', default=['eager', 'cuda_graphs'], choices=MODES)
    parser.add_argument('--tasks', nargs='+', choices=sorted(TASKS))
    parser.add_argument('--sizes', nargs='+', choices=sorted(SIZES))
    parser.add_argument('--batches', nargs='+', type=int)
    parser.add_argument('--precisions', nargs='+', choices=('fp16', 'bf16'))
    parser.add_argument('--gc-freeze', action='store_true',
                        help='gc.collect() + gc.freeze() after each warm-up (p99 experiment)')
    parser.add_argument('--profile', metavar='TXT',
                        help='also write a torch.profiler table of the first configuration')
    parser.add_argument('--profile-sparse', metavar='PREFIX',
                        help='write a torch.profiler table of model.detect alone for every '
                             'selected detection configuration to PREFIX_<task>_<size>_b<B>.txt')
    parser.add_argument('--head-layout', choices=('default', 'channels_last', 'contiguous'),
                        default='default',
                        help="memory format of the heads' conv weights, set after Pipeline "
                             "made them channels-last on CUDA (experiment)")
    parser.add_argument('--compile-dynamic-batch', action='store_true',
                        help='Pipeline(compile_dynamic_batch=True): one compiled graph for every '
                             'batch above 1 (compare warmup_s and p50 with a run without)')
    parser.add_argument('--cudnn-benchmark', action='store_true',
                        help='torch.backends.cudnn.benchmark = True (experiment)')
    add_coarse_fusion_option(parser)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    HEAD_LAYOUT['layout'] = args.head_layout
    COMPILE_OPTIONS['compile_dynamic_batch'] = args.compile_dynamic_batch
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    coarse_fusion = apply_coarse_fusion_option(args)

    import mamba_perception_kernels as kernels

    from mamba_perception.models.bundle import create_random_bundle
    bundles = {
        'det': create_random_bundle(backbone='vmamba_tiny', tasks=('detection',),
                                    num_classes=80),
        'seg': create_random_bundle(backbone='vmamba_tiny', tasks=('segmentation',),
                                    num_classes=150),
        'detseg': create_random_bundle(backbone='vmamba_tiny',
                                       tasks=('detection', 'segmentation'), num_classes=80),
    }
    report = {
        'question': 'End-to-end Pipeline latency (host uint8 frames in, host results out)',
        'command': ' '.join([sys.executable, *sys.argv]),
        'date_utc': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
        'gpu': torch.cuda.get_device_name(0),
        'versions': {'torch': torch.__version__, 'cuda': torch.version.cuda,
                     'python': platform.python_version(),
                     'torchvision': __import__('torchvision').__version__,
                     'triton': getattr(__import__('triton'), '__version__', None)},
        'scan_backend': kernels.backend_name(torch.device('cuda')),
        'model': 'VMamba-T[s1l8] (vmamba_tiny) + FPN Mask R-CNN (RPN 1000 proposals, box head; '
                 'mask branch not run) and/or UperNet (512 ch, 150 classes); RANDOM weights',
        'input_policy': bundles['det'].input_policy,
        'timing': 'perf_counter around pipeline(frames) (synchronous: ends with the host copy)'
                  '; stage split from CUDA events; p50/p99 over the timed calls',
        'target': 'VMamba-T det+seg 1280x720 batch 1 <= 8 ms p99',
        'head_layout': args.head_layout, 'cudnn_benchmark': args.cudnn_benchmark,
        'compile_dynamic_batch': args.compile_dynamic_batch,
        'upernet_coarse_fusion': coarse_fusion,
        'results': [], 'skipped': [], 'errors': [],
    }
    todo = select(configs(args.quick, tuple(args.modes), tuple(args.batches or (1, 4))), args)
    if args.profile and todo:
        profile_table(bundles, todo[0], args.profile)
    if args.profile_sparse:
        for cfg in todo:
            if cfg[0] != 'seg':
                profile_sparse(bundles, cfg, f'{args.profile_sparse}_{cfg[0]}_{cfg[1]}_b{cfg[2]}'
                                             '.txt')
    for cfg in todo:
        if time.perf_counter() - start > args.budget_s:
            report['skipped'].append(dict(zip(('task', 'size', 'batch', 'precision', 'mode'),
                                              cfg, strict=True)))
            continue
        try:
            row = run_one(bundles, *cfg, frames_min=args.frames, warmup=args.warmup,
                          gc_freeze=args.gc_freeze)
            report['results'].append(row)
            print(f"{cfg}: p50 {row['latency_ms_p50']:.2f} ms p99 {row['latency_ms_p99']:.2f} ms"
                  f" stages {row['stage_ms_p50']} mem {row['peak_memory_mib']:.0f} MiB",
                  flush=True)
        except Exception as err:  # record and go on: one failing mode must not hide the rest
            report['errors'].append({'config': list(cfg), 'error': f'{type(err).__name__}: '
                                                                    f'{str(err)[:500]}'})
            print(f'{cfg}: ERROR {type(err).__name__}: {err}', flush=True)
        torch.cuda.empty_cache()
        with open(args.out, 'w') as f:
            json.dump(report, f, indent=1)
    report['wall_s'] = time.perf_counter() - start
    with open(args.out, 'w') as f:
        json.dump(report, f, indent=1)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
