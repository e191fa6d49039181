"""What publishing one frame's detections costs the node's worker thread (CPU, real rclpy).

The node used to build a ``vision_msgs/Detection2DArray`` of Python objects and let rclpy
convert it (``detections_to_msg`` + ``publish``); it now serializes the CDR itself
(``detections_to_cdr``) and publishes the bytes. Both are timed here per frame for 0, 10 and
100 boxes (Mask R-CNN keeps up to 100 a frame), on a real rclpy publisher with one subscriber
in the same process (so Fast DDS delivers every message), wall clock, median of repeats.

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--iters', type=int, default=200)
    parser.add_argument('--out', required=True)
    args = parser.parse_args()
    os.environ.setdefault('ROS_DOMAIN_ID', str(100 + os.getpid() % 100))
    import rclpy
    from rclpy.qos import qos_profile_sensor_data
    from std_msgs.msg import Header
    from vision_msgs.msg import Detection2DArray

    from mamba_perception.ros import conversions

    rclpy.init()
    node = rclpy.create_node('detections_publish_bench')
    pub = node.create_publisher(Detection2DArray, 'bench/detections', qos_profile_sensor_data)
    received = []
    node.create_subscription(Detection2DArray, 'bench/detections', received.append,
                             qos_profile_sensor_data, raw=True)
    header = Header(frame_id='camera_front_optical')
    header.stamp.sec, header.stamp.nanosec = 1_700_000_000, 123_456_789
    rows = []
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
        rclpy.spin_once(node, timeout_sec=0.1)
    finally:
        node.destroy_node()
        rclpy.shutdown()
    write_json(args.out, {
        'provenance': provenance({'device': 'cpu', 'cpus': os.cpu_count()}),
        'what': 'per frame: build the Detection2DArray (rclpy message objects, or CDR bytes) '
                'and publish it; one in-process raw subscriber; wall clock ms, median of 5 '
                f'means over {args.iters} calls',
        'rows': rows})
    return 0


if __name__ == '__main__':
    sys.exit(main())
