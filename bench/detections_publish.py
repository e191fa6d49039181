"""What publishing one frame's detections and mask costs the node's worker thread (CPU, rclpy).

The node used to build a ``vision_msgs/Detection2DArray`` of Python objects and let rclpy
convert it (``detections_to_msg`` + ``publish``); it now serializes the CDR itself
(``detections_to_cdr``) and publishes the bytes. Both are timed here per frame for 0, 10 and
100 boxes (Mask R-CNN keeps up to 100 a frame), on a real rclpy publisher with one subscriber
in the same process (so Fast DDS delivers every message), wall clock, median of repeats.
The same for the mono8 class mask at 1280x720 and 1920x1080: a ``sensor_msgs/Image`` message
(``array_to_image``) or its CDR bytes (``mask_to_cdr``, what the node publishes).

    python bench/detections_publish.py --out bench/results/detections_publish_cpu.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import provenance, write_json  # noqa: E402


def frame_result(boxes: int, seed: int = 0):
    """Return a FrameResult with ``boxes`` random detections in a 1280x720 frame."""
    from mamba_perception.results import Detections, FrameResult

    rng = np.random.default_rng(seed)
    xy = rng.random((boxes, 2)) * [1200, 650]
    xyxy = np.concatenate([xy, xy + rng.random((boxes, 2)) * 80], 1).astype(np.float32)
    return FrameResult(720, 1280, Detections(xyxy, rng.random(boxes).astype(np.float32),
                                             rng.integers(0, 80, boxes)))


def time_ms(fn, iters: int, repeats: int = 5) -> float:
    """Median over ``repeats`` of the mean wall time of ``iters`` calls, in ms."""
    for _ in range(10):
        fn()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        runs.append((time.perf_counter() - start) / iters * 1e3)
    return statistics.median(runs)


def time_alternating_ms(fns: dict, iters: int, repeats: int = 15) -> dict:
    """Return {name: median over ``repeats`` of the mean wall time of ``iters`` calls}.

    The functions take turns, each repeat in the opposite order of the previous one.
    """
    for fn in fns.values():
        for _ in range(10):
            fn()
    runs = {name: [] for name in fns}
    for rep in range(repeats):
        for name in (list(fns) if rep % 2 else list(fns)[::-1]):
            start = time.perf_counter()
            for _ in range(iters):
                fns[name]()
            runs[name].append((time.perf_counter() - start) / iters * 1e3)
    return {name: statistics.median(v) for name, v in runs.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--iters', type=int, default=200)
    parser.add_argument('--out', required=True)
    args = parser.parse_args()
    os.environ.setdefault('ROS_DOMAIN_ID', str(100 + os.getpid() % 100))
    import rclpy
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image
    from std_msgs.msg import Header
    from vision_msgs.msg import Detection2DArray

    from mamba_perception.ros import conversions

    rclpy.init()
    node = rclpy.create_node('detections_publish_bench')
    pub = node.create_publisher(Detection2DArray, 'bench/detections', qos_profile_sensor_data)
    mask_pub = node.create_publisher(Image, 'bench/mask', qos_profile_sensor_data)
    received = []
    node.create_subscription(Detection2DArray, 'bench/detections', received.append,
                             qos_profile_sensor_data, raw=True)
    node.create_subscription(Image, 'bench/mask', received.append, qos_profile_sensor_data,
                             raw=True)
    header = Header(frame_id='camera_front_optical')
    header.stamp.sec, header.stamp.nanosec = 1_700_000_000, 123_456_789
    rows, mask_rows = [], []
    try:
        for boxes in (0, 10, 100):
            result = frame_result(boxes)
            row = {'boxes': boxes}
            for name, build in (('message', conversions.detections_to_msg),
                                ('cdr', conversions.detections_to_cdr)):
                row[f'{name}_build_ms'] = time_ms(
                    lambda b=build, r=result: b(r, header), args.iters)
                row[f'{name}_build_publish_ms'] = time_ms(
                    lambda b=build, r=result: pub.publish(b(r, header)), args.iters)
            rows.append(row)
            print(row, flush=True)
        for height, width in ((720, 1280), (1080, 1920)):
            mask = np.random.default_rng(0).integers(0, 150, (height, width), dtype=np.uint8)
            builds = {'message': lambda m=mask: conversions.array_to_image(m, header, 'mono8'),
                      'cdr': lambda m=mask: conversions.mask_to_cdr(m, header)}
            row = {'size': [height, width]}
            # alternated per repeat, so that neither runs in the allocator state the other left.
            # Building the message alone measured ~1 ms at 720p on the development machine,
            # with a publish between the builds ~0.1 ms (the allocator's state, not the work:
            # not investigated further); the CDR bytes cost the same either way
            row.update({f'{name}_build_ms': ms for name, ms in time_alternating_ms(
                builds, args.iters).items()})
            row.update({f'{name}_build_publish_ms': ms for name, ms in time_alternating_ms(
                {name: lambda b=build: mask_pub.publish(b()) for name, build in builds.items()},
                args.iters).items()})
            mask_rows.append(row)
            print(row, flush=True)
        rclpy.spin_once(node, timeout_sec=0.1)
    finally:
        node.destroy_node()
        rclpy.shutdown()
    write_json(args.out, {
        'provenance': provenance({'device': 'cpu', 'cpus': os.cpu_count()}),
        'what': 'per frame: build the Detection2DArray (rclpy message objects, or CDR bytes) '
                'and publish it; one in-process raw subscriber; wall clock ms, median of 5 '
                f'means over {args.iters} calls',
        'rows': rows,
        'mask_what': 'per frame: build the mono8 class-mask Image (rclpy message, or CDR '
                     'bytes) and publish it, same subscriber; the two variants alternate, median '
                     f'of 15 means over {args.iters} calls each',
        'mask_rows': mask_rows})
    return 0


if __name__ == '__main__':
    sys.exit(main())
