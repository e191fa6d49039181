"""Live mode: play a bag's camera topic into a running perception node and measure it over DDS.

Offline replay (:mod:`.cli`) answers accuracy and per-stage latency deterministically; live mode
answers what the running system does: stamp-to-publish latency (publish time of the node's
output minus the time the frame was published here), frames dropped (inputs that got no output),
and output rate, with the same accuracy metrics over the frames that did come back.

Frames are published at their recorded spacing divided by ``rate``; with ``clock=True`` a
``/clock`` message carrying the frame's recorded log time is published before each frame, so a
node started with ``use_sim_time:=true`` lives in the bag's time. The node is either already
running (give its input and output topics) or started here as a real process
(:func:`start_node`).

This is the only replay module that imports rclpy, and only inside its functions.

Status: implemented, not yet exercised by a test against the node (see the module's tests).
"""

from __future__ import annotations

from dataclasses import dataclass, field
import os
from pathlib import Path
import subprocess
import sys
import time
from typing import Any, Optional, Sequence

import numpy as np

from mamba_perception.errors import BagError
from mamba_perception.replay.bag import BagReader, decode_detections, header_stamp_ns
from mamba_perception.replay.metrics import latency_stats


@dataclass
class LiveResult:
    """What a live run measured; ``summary()`` gives the report section."""

    sent: dict = field(default_factory=dict)  # stamp ns -> wall ns when published
    received: dict = field(default_factory=dict)  # stamp ns -> (wall ns, Detection2DArray)
    duration_s: float = 0.0

    def summary(self) -> dict:
        """Summarise: counts first, then stamp-to-publish latency, drops and output rate."""
        latencies = [(self.received[s][0] - t) / 1e6 for s, t in self.sent.items()
                     if s in self.received]
        dropped = len(self.sent) - len(latencies)
        return {'frames_sent': len(self.sent), 'outputs_received': len(latencies),
                'dropped_frames': dropped,
                'drop_rate': dropped / len(self.sent) if self.sent else None,
                'output_rate_hz': len(latencies) / self.duration_s if self.duration_s else None,
                'stamp_to_publish_latency_ms': latency_stats(latencies)}


def start_node(bundle: str, camera: str = 'camera', compressed: bool = True,
               sim_time: bool = True, extra_args: Sequence[str] = (),
               env: Optional[dict] = None, log_path: Optional[str] = None
               ) -> subprocess.Popen:
    """Start ``perception_node`` as a process (where ``ros2 run`` finds it) for one camera."""
    exe = Path(sys.prefix) / 'lib' / 'mamba_perception' / 'perception_node'
    argv = [str(exe), '--ros-args', '-p', f'bundle_path:={bundle}', '-p',
            f'cameras:=[{camera}]', '-p',
            f'input_transport:={"compressed" if compressed else "raw"}',
            '-p', f'use_sim_time:={"true" if sim_time else "false"}', *extra_args]
    log = open(log_path, 'wb') if log_path else subprocess.DEVNULL
    return subprocess.Popen(argv, env={**os.environ, **(env or {})}, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def run_live(bag: os.PathLike | str, camera_topic: str, node_input_topic: str,
             detections_topic: str, rate: float = 1.0, clock: bool = True,
             wait_for_subscriber_s: float = 30.0, drain_s: float = 2.0,
             max_frames: Optional[int] = None, domain_id: Optional[int] = None) -> LiveResult:
    """Publish ``camera_topic`` of ``bag`` onto ``node_input_topic``; record detections.

    The bag's serialized messages are published as they are (no re-encoding).
    """
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from rclpy.serialization import deserialize_message
    from rosgraph_msgs.msg import Clock
    from sensor_msgs.msg import CompressedImage, Image
    from vision_msgs.msg import Detection2DArray

    if rate <= 0:
        raise ValueError(f'rate must be > 0, got {rate}')
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=domain_id)
    node = rclpy.create_node('mamba_perception_live_replay', context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    result = LiveResult()
    try:
        with BagReader(bag) as reader:
            reader.require_topics([camera_topic])
            msgtype = reader.topics[camera_topic]
            ros_type = CompressedImage if msgtype.endswith('CompressedImage') else Image
            reliable = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
            pub = node.create_publisher(ros_type, node_input_topic, reliable)
            clock_pub = node.create_publisher(Clock, '/clock', 10) if clock else None

            def on_detections(msg: Any) -> None:
                stamp = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
                result.received.setdefault(stamp, (time.time_ns(), msg))

            node.create_subscription(Detection2DArray, detections_topic, on_detections, 10)
            deadline = time.monotonic() + wait_for_subscriber_s
            while pub.get_subscription_count() == 0:
                if time.monotonic() > deadline:
                    raise BagError(f'no subscriber on {node_input_topic} after '
                                   f'{wait_for_subscriber_s} s: is the node running?')
                executor.spin_once(timeout_sec=0.05)
            start_wall = time.monotonic()
            first_log = None
            for m in reader.messages([camera_topic]):
                if max_frames and m.index >= max_frames:
                    break
                first_log = m.log_time_ns if first_log is None else first_log
                due = start_wall + (m.log_time_ns - first_log) / 1e9 / rate
                while time.monotonic() < due:
                    executor.spin_once(timeout_sec=min(0.01, max(0.0, due - time.monotonic())))
                if clock_pub is not None:
                    clock_pub.publish(Clock(clock=_time_msg(m.log_time_ns)))
                raw = reader.typestore.serialize_cdr(m.msg, msgtype)
                out = deserialize_message(bytes(raw), ros_type)
                result.sent[header_stamp_ns(m.msg, m.log_time_ns)] = time.time_ns()
                pub.publish(out)
            end = time.monotonic() + drain_s
            while time.monotonic() < end:
                executor.spin_once(timeout_sec=0.05)
            result.duration_s = time.monotonic() - start_wall
    finally:
        executor.shutdown()
        node.destroy_node()
        rclpy.shutdown(context=context)
    return result


def score_live(result: LiveResult, class_names: Sequence[str]) -> list:
    """Received detections as (stamp_ns, boxes, class ids, scores) for accuracy scoring."""
    out = []
    for stamp, (_t, msg) in sorted(result.received.items()):
        boxes, ids, scores, _unknown = decode_detections(msg, class_names)
        out.append((stamp, boxes, ids, np.asarray(scores)))
    return out


def _time_msg(ns: int) -> Any:
    from builtin_interfaces.msg import Time
    return Time(sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000)


__all__ = ['LiveResult', 'run_live', 'score_live', 'start_node']
