"""Node overhead beyond the Pipeline, and stamp-to-publish latency with 1, 2 and 4 cameras.

Two parts, each writing JSON (``--out``):

* ``overhead``: per frame, the node's own work for 1280x720 and 1920x1080 frames — the
  received CDR bytes to a message (rclpy's conversion vs the node's rosbags view), raw bgr8
  to RGB (``image_to_rgb``, a zero-copy view) plus the host->device upload the pipeline then
  does, JPEG decode on the CPU (OpenCV) and on the GPU (nvJPEG through torchvision), and, where
  the ROS message packages are installed, building the output messages (Detection2DArray of
  20 boxes, mono8 mask). Wall-clock medians of ``--repeats`` runs (``perf_counter``, CUDA
  synchronised). DDS transport is not in it.
* ``latency``: the node's data path without DDS — one feeder thread per camera stamps frames at
  ``--rate-hz`` into the node's one-slot buffers (:class:`LatestFrames`), the node's worker
  (:class:`InferenceWorker`) decodes, batches and runs the Pipeline, then builds the outputs;
  latency = publish time - stamp. p50/p99 per camera count, with frames dropped; the worker in
  one stage or in two (``--pipelined``: decode + ``Pipeline.submit``, then ``collect`` + build,
  on ``Pipeline.stage_streams``, as the node), with the node's ``batch_window_ms``
  (``--batch-window-ms``); ``--profile-dir`` adds a 1 s GPU timeline
  (torch.profiler) of the largest camera count and the GPU's busy fraction in it.

Run: ``python bench/node_latency.py --device cuda --precision fp16 --backbone vmamba_tiny``.
"""

# ruff: noqa: B023  (each closure runs inside the loop iteration that defines it)
import argparse
import contextlib
import json
import os
import platform
import sys
import threading
import time
from types import SimpleNamespace

import cv2
import numpy as np
import torch

from mamba_perception.models.bundle import create_random_bundle
from mamba_perception.pipeline import Pipeline
from mamba_perception.results import Detections, FrameResult
from mamba_perception.ros import conversions, params
from mamba_perception.ros.latest_frame import InferenceWorker, LatestFrames

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import add_coarse_fusion_option, apply_coarse_fusion_option  # noqa: E402

SIZES = {'1280x720': (720, 1280), '1920x1080': (1080, 1920)}


def fake_frame(height, width, seed=0):
    """Return a textured frame (JPEG size like a real scene): smoothed noise."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 255, (height // 8, width // 8, 3), np.uint8)
    img = cv2.resize(noise, (width, height), interpolation=cv2.INTER_CUBIC)
    return img


def raw_msg(bgr, stamp_ns=0):
    """Return an object with sensor_msgs/Image fields (the decoders read fields only)."""
    return SimpleNamespace(height=bgr.shape[0], width=bgr.shape[1], encoding='bgr8',
                           step=bgr.shape[1] * 3, data=bgr.tobytes(), stamp_ns=stamp_ns)


def timed(fn, repeats, sync, warmup=3):
    for _ in range(warmup):  # first calls: CUDA context, allocator, nvJPEG handles
        fn()
    out = []
    for _ in range(repeats):
        if sync:
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        out.append((time.perf_counter() - t) * 1e3)
    return {'p50_ms': float(np.percentile(out, 50)), 'p99_ms': float(np.percentile(out, 99)),
            'repeats': repeats}


def overhead(args):
    cuda = args.device.startswith('cuda')
    results = {}
    for name, (h, w) in SIZES.items():
        bgr = fake_frame(h, w)
        msg = raw_msg(bgr)
        jpeg = SimpleNamespace(format='bgr8; jpeg compressed bgr8',
                               data=cv2.imencode('.jpg', bgr, [cv2.IMWRITE_JPEG_QUALITY, 90])[1]
                               .tobytes())
        entry = {'jpeg_bytes': len(jpeg.data)}
        entry['raw_to_rgb_view'] = timed(lambda: conversions.image_to_rgb(msg), args.repeats,
                                         False)
        if cuda:
            def raw_upload():
                rgb = conversions.image_to_rgb(msg)
                torch.from_numpy(np.ascontiguousarray(rgb)).to(args.device, non_blocking=False)
            entry['raw_to_rgb_plus_upload'] = timed(raw_upload, args.repeats, True)
            entry['raw_to_device_rgb_unstaged'] = timed(
                lambda: conversions.image_to_device_rgb(msg, args.device), args.repeats, True)
            staging = conversions.HostStaging()  # the node's path: one per camera
            entry['raw_to_device_rgb_node_path'] = timed(
                lambda: conversions.image_to_device_rgb(msg, args.device, staging=staging),
                args.repeats, True)
            # the node's decode stage timer stops before the asynchronous copy finishes
            entry['raw_to_device_rgb_node_path_host_time'] = timed(
                lambda: conversions.image_to_device_rgb(msg, args.device, staging=staging),
                args.repeats, False)
            entry['raw_upload_of_contiguous_bgr_baseline'] = timed(
                lambda: torch.from_numpy(bgr).to(args.device), args.repeats, True)
        entry['jpeg_decode_cpu'] = timed(lambda: conversions.compressed_to_rgb(jpeg),
                                         args.repeats, False)
        if cuda and conversions.gpu_jpeg_available():
            entry['jpeg_decode_gpu'] = timed(
                lambda: conversions.compressed_to_rgb(jpeg, decoder='gpu', device=args.device),
                args.repeats, True)
        try:  # the executor thread's share: the received bytes -> a message
            from rclpy.serialization import deserialize_message, serialize_message
            from sensor_msgs.msg import Image
            image = Image(height=h, width=w, encoding='bgr8', step=w * 3)
            image.data = bgr.tobytes()
            cdr = serialize_message(image)
            entry['input_rclpy_message_from_cdr'] = timed(
                lambda: deserialize_message(cdr, Image), args.repeats, False)
            entry['input_node_path_from_cdr'] = timed(  # raw subscription + rosbags
                lambda: conversions.deserialize_image(cdr), args.repeats, False)
        except ImportError:
            entry['input_rclpy_message_from_cdr'] = 'not measured: no rclpy here'
        try:
            from std_msgs.msg import Header
            boxes = np.tile(np.array([[10, 20, 200, 300]], np.float32), (20, 1))
            result = FrameResult(h, w, Detections(boxes, np.full(20, 0.5, np.float32),
                                                  np.zeros(20, np.int64)),
                                 np.zeros((h, w), np.uint8))

            def build():  # what the node publishes: the detections as CDR bytes, the mask
                conversions.detections_to_cdr(result, Header())
                conversions.mask_to_cdr(result.class_mask, Header())
            entry['build_output_msgs'] = timed(build, args.repeats, False)
        except ImportError:
            entry['build_output_msgs'] = 'not measured: ROS message packages not installed here'
        results[name] = entry
    return results


def gpu_timeline(trace_path: str) -> dict:
    """GPU busy time per stream and overall (union of kernel intervals) from a chrome trace."""
    with open(trace_path) as f:
        events = json.load(f).get('traceEvents', [])
    kernels = [e for e in events if e.get('cat') == 'kernel' and 'dur' in e]
    if not kernels:
        return {'kernels': 0}
    spans = sorted((float(e['ts']), float(e['ts']) + float(e['dur'])) for e in kernels)
    window = spans[-1][1] - spans[0][0]
    busy, end = 0.0, -1e30
    for a, b in spans:  # union of the intervals
        if b > end:
            busy += b - max(a, end)
            end = b
    per_stream: dict = {}
    for e in kernels:
        stream = str(e.get('args', {}).get('stream', '?'))
        per_stream[stream] = per_stream.get(stream, 0.0) + float(e['dur'])
    return {'kernels': len(kernels), 'window_ms': window / 1e3, 'gpu_busy_ms': busy / 1e3,
            'gpu_busy_fraction': busy / window if window > 0 else None,
            'kernel_ms_per_stream': {k: v / 1e3 for k, v in sorted(per_stream.items())},
            # The trace itself is too large to bring back from the lent machine: what each
            # kernel and, per host thread, each CUDA runtime call (launches, synchronisations)
            # took in the window.
            'top_kernels': _top_by_name(kernels, 20),
            'cuda_runtime_per_thread': {
                str(tid): _top_by_name([e for e in events if e.get('cat') == 'cuda_runtime'
                                        and 'dur' in e and e.get('tid') == tid], 8)
                for tid in sorted({e.get('tid') for e in events
                                   if e.get('cat') == 'cuda_runtime'}, key=str)}}


def _top_by_name(events: list, n: int) -> list:
    """Return the n names with the most total duration as [{name, ms, calls}] (dur in us)."""
    total: dict = {}
    for e in events:
        ms, calls = total.get(e['name'], (0.0, 0))
        total[e['name']] = (ms + float(e['dur']) / 1e3, calls + 1)
    ranked = sorted(total.items(), key=lambda kv: -kv[1][0])[:n]
    return [{'name': name[:120], 'ms': round(ms, 3), 'calls': calls}
            for name, (ms, calls) in ranked]


def latency(args, pipeline):
    """Run the node's worker path without DDS, in one or two stages, per camera count."""
    size = SIZES[args.latency_size]
    cuda = args.device.startswith('cuda')
    out = {}
    for cameras in args.cameras:
        for mode in args.pipelined:
            for window_ms in args.batch_window_ms:
                key = (f'{cameras}_cameras' + ('' if mode == 'off' else '_pipelined')
                       + (f'_window{window_ms:g}ms' if window_ms > 0 else ''))
                out[key] = run_cameras(args, pipeline, cameras, mode == 'on', size, cuda,
                                       window_ms)
                print(key, json.dumps({k: v for k, v in out[key].items() if k != 'profile'}),
                      flush=True)
    return out


def run_cameras(args, pipeline, cameras: int, pipelined: bool, size, cuda: bool,
                window_ms: float = 0.0) -> dict:
    names = [f'cam{i}' for i in range(cameras)]
    frames = LatestFrames(names, batch_window_s=window_ms / 1e3)  # the node's batch_window_ms
    bgr = [fake_frame(*size, seed=i) for i in range(cameras)]
    lat_ms = {n: [] for n in names}
    stage = {'decode_ms': [], 'submit_ms': [], 'collect_ms': [], 'build_ms': []}
    staging = {n: conversions.HostStaging() for n in names}
    # as the node: submit and collect on their own streams when pipelined
    streams = pipeline.stage_streams() if pipelined else []

    def on_stream(i):
        return torch.cuda.stream(streams[i]) if streams else contextlib.nullcontext()

    def submit(taken):
        t0 = time.perf_counter()
        keys = list(taken)
        with on_stream(0):
            rgb = [conversions.image_to_device_rgb(taken[k], args.device, staging=staging[k])
                   if cuda else conversions.image_to_rgb(taken[k]) for k in keys]
            t1 = time.perf_counter()
            pending = pipeline.submit(rgb)
        stage['decode_ms'].append((t1 - t0) * 1e3)
        stage['submit_ms'].append((time.perf_counter() - t1) * 1e3)
        return keys, taken, pending

    def finish(handle):
        keys, taken, pending = handle
        t0 = time.perf_counter()
        with on_stream(1):
            results = pipeline.collect(pending)
        t1 = time.perf_counter()
        for k, r in zip(keys, results, strict=True):
            conversions.check_result(r)
            try:
                from std_msgs.msg import Header
                conversions.detections_to_cdr(r, Header())
                conversions.mask_to_cdr(r.class_mask, Header())
            except ImportError:
                pass
            lat_ms[k].append((time.time_ns() - taken[k].stamp_ns) / 1e6)
        stage['collect_ms'].append((t1 - t0) * 1e3)
        stage['build_ms'].append((time.perf_counter() - t1) * 1e3)

    if pipelined:
        worker = InferenceWorker(frames, submit, finish=finish)
    else:
        worker = InferenceWorker(frames, lambda taken: finish(submit(taken)))
    worker.start()
    stop = threading.Event()
    sent = {n: 0 for n in names}

    def feed(name, image):
        period = 1.0 / args.rate_hz
        next_t = time.perf_counter()
        while not stop.is_set():
            frames.put(name, raw_msg(image, time.time_ns()))
            sent[name] += 1
            next_t += period
            time.sleep(max(0.0, next_t - time.perf_counter()))

    feeders = [threading.Thread(target=feed, args=(n, b), daemon=True)
               for n, b in zip(names, bgr, strict=True)]
    for f in feeders:
        f.start()
    profile = None
    if args.profile_dir and cuda and cameras == max(args.cameras):
        # One second of GPU timeline in the middle of the run: are the stages overlapping,
        # and is the GPU busy? (torch.profiler sees every thread's CUDA work.)
        time.sleep(min(2.0, args.seconds / 3))
        trace = os.path.join(args.profile_dir,
                             f'trace_{cameras}cam_{"pipelined" if pipelined else "serial"}.json')
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            time.sleep(1.0)
        prof.export_chrome_trace(trace)
        profile = {'trace': trace, **gpu_timeline(trace)}
        time.sleep(max(0.0, args.seconds - 1.0 - min(2.0, args.seconds / 3)))
    else:
        time.sleep(args.seconds)
    stop.set()
    for f in feeders:
        f.join()
    time.sleep(0.5)
    worker.stop()
    all_lat = np.concatenate([np.asarray(v) for v in lat_ms.values()])
    result = {
        'pipelined': pipelined,
        'batch_window_ms': window_ms,
        'frames_sent': int(sum(sent.values())),
        'frames_published': int(all_lat.size),
        'frames_dropped': int(sum(frames.dropped.values())),
        'output_rate_hz_per_camera': float(all_lat.size / cameras / args.seconds),
        'stamp_to_publish_p50_ms': float(np.percentile(all_lat, 50)) if all_lat.size else None,
        'stamp_to_publish_p99_ms': float(np.percentile(all_lat, 99)) if all_lat.size else None,
        'batches': worker.batches,
        'frames_per_batch': float(all_lat.size / max(worker.batches, 1)),
        **{f'{k}_p50': float(np.percentile(v, 50)) for k, v in stage.items() if v},
    }
    if profile is not None:
        result['profile'] = profile
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--device', default='cuda')
    parser.add_argument('--precision', default='fp16')
    parser.add_argument('--backbone', default='vmamba_tiny')
    parser.add_argument('--cuda-graphs', action='store_true')
    parser.add_argument('--repeats', type=int, default=50)
    parser.add_argument('--rate-hz', type=float, default=30.0)
    parser.add_argument('--seconds', type=float, default=8.0)
    parser.add_argument('--latency-size', default='1280x720', choices=sorted(SIZES))
    parser.add_argument('--skip-latency', action='store_true')
    parser.add_argument('--cameras', type=int, nargs='+', default=[1, 2, 4])
    parser.add_argument('--pipelined', choices=('on', 'off'), nargs='+', default=['off', 'on'],
                        help='the worker in one stage (off) or two (on, the node default)')
    parser.add_argument('--compile', action='store_true')
    parser.add_argument('--profile-dir', help='CUDA: a 1 s torch.profiler trace of the largest '
                                              'camera count per mode, and its GPU busy time')
    parser.add_argument('--skip-overhead', action='store_true')
    parser.add_argument('--batch-window-ms', type=float, nargs='+',
                        default=[params.BY_NAME['batch_window_ms'].default],
                        help="the node's batch_window_ms; several values: one run each")
    add_coarse_fusion_option(parser)
    parser.add_argument('--out', required=True)
    args = parser.parse_args()
    coarse_fusion = apply_coarse_fusion_option(args)
    report = {
        'benchmark': 'node_latency',
        'provenance': {'host': platform.node(), 'python': platform.python_version(),
                       'torch': torch.__version__,
                       'device_name': (torch.cuda.get_device_name(0)
                                       if torch.cuda.is_available() else platform.processor()),
                       'args': vars(args), 'timing': 'perf_counter wall clock, CUDA synced',
                       'frames': 'synthetic textured frames (smoothed noise)',
                       'dds': 'not included (no rclpy on this machine or measured separately)'},
    }
    report['upernet_coarse_fusion'] = coarse_fusion
    if not args.skip_overhead:
        report['overhead_per_frame'] = overhead(args)
        print(json.dumps(report['overhead_per_frame'], indent=1), flush=True)
    if not args.skip_latency:
        bundle = create_random_bundle(backbone=args.backbone,
                                      tasks=('detection', 'segmentation'), num_classes=80)
        pipeline = Pipeline(bundle, device=args.device, precision=args.precision,
                            cuda_graphs=args.cuda_graphs, compile=args.compile)
        h, w = SIZES[args.latency_size]
        t = time.perf_counter()
        # every batch size the worker can form (as the node warms up), so none is met live
        pipeline.warmup([(b, h, w) for b in range(1, max(args.cameras) + 1)], iterations=3)
        report['warmup_s'] = time.perf_counter() - t
        report['model'] = repr(pipeline)
        report['latency'] = latency(args, pipeline)
    with open(args.out, 'w') as f:
        json.dump(report, f, indent=1)


if __name__ == '__main__':
    main()
