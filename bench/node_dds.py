r"""End-to-end latency of the real perception node over real DDS, with 1, 2 and 4 cameras.

What is measured: one perception node process (``python -m mamba_perception.ros.node``, the
same entry point as ``ros2 run``) serves ``n`` cameras. This process publishes real video frames
(OpenCV's vtest.avi, resized to ``--size``) on ``<cam>/image`` (or ``<cam>/image/compressed``)
at ``--rate-hz``, all cameras on the same tick (synchronised cameras), and subscribes to the
node's ``<cam>/detections``, ``<cam>/segmentation/mask`` and ``/diagnostics``. Each message's
``header.stamp`` is set from the ROS clock (system time, no sim time) just before its
``publish()`` call; the node copies the header to its outputs, so on receipt

    latency = receive time (same host clock, in the subscription callback) - header.stamp

covers: serialisation and DDS transport of the frame, the node's one-slot buffer, decode,
Pipeline (preprocess, inference, postprocess), building and publishing the outputs, DDS
transport back and delivery to this process's callback. Only frames stamped after a settle
period (every camera has produced output, then ``--settle-s`` more) and before the end of the
``--seconds`` timed window count. The node's own per-stage p50/p99 and drop counters are read
from its ``/diagnostics`` (last status received in the timed window).

GPU run (H100)::

    python bench/node_dds.py --device cuda --precision fp16 --backbone vmamba_tiny \
        --video /path/to/vtest.avi --out bench/results/node_dds_h100.json

CPU smoke run (tiny model, 64 px network input)::

    python bench/node_dds.py --device cpu --precision fp32 --backbone vmamba_test \
        --tiny-policy --size 384x288 --cameras 1 2 --rate-hz 10 --seconds 5 --settle-s 2 \
        --out /tmp/node_dds_cpu.json

DDS: by default both processes use Fast DDS's LARGE_DATA transports (``--dds large_data``):
with the default transports and discovery limited to localhost (``--dds localhost``, as the
tests run) rmw_fastrtps loses most best-effort raw 720p frames before the node sees them.
``--dds env`` leaves the DDS environment as given.

The package must be importable by the node process too (it inherits this environment, e.g.
``PYTHONPATH``). The run takes its own ``ROS_DOMAIN_ID`` (random 1..100 unless already set).
"""

import argparse
import array
import datetime
import json
import math
import os
from pathlib import Path
import platform
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback

import numpy as np

from mamba_perception.ros import params  # the node's parameter table (no rclpy)
from mamba_perception.ros.diagnostics import STAGES  # the node's stage names (no rclpy)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import PERCEPTION_TASKS as TASKS  # noqa: E402

CLASS_NAMES = [f'class_{i}' for i in range(80)]  # COCO-sized head
# As test/ros/ros_node_helpers.py: the network input is capped at 64 px so a CPU forward takes
# tens of ms, while the frames (and the masks and boxes returned) keep their own size.
TINY_POLICY = {'color_order': 'RGB', 'mean': [123.675, 116.28, 103.53],
               'std': [58.395, 57.12, 57.375], 'max_long_side_px': 64, 'max_short_side_px': 64,
               'allow_upscale': False, 'pad_multiple_px': 32}
TINY_WARMUP_HW = (64, 64)
OUTPUT_KINDS = {'detections': 'detections', 'masks': 'segmentation/mask'}
JPEG_QUALITY = 90
OUTPUT_READER_DEPTH = 50  # this process's reader queue: deep enough never to drop on our side
STOP_TIMEOUT_S = 20.0
DRAIN_QUIET_S = 2.0  # after the window: stop waiting once no output came for this long
DRAIN_MAX_S = 30.0
LOG_TAIL_CHARS = 4000
NS = 1_000_000_000

DDS_SETUPS = {
    # Fast DDS's LARGE_DATA builtin transports (discovery over UDP, data over shared memory or
    # TCP). rmw_fastrtps only lets Fast DDS pick its transports when the discovery range is not
    # LOCALHOST (with LOCALHOST it installs its own UDP-on-127.0.0.1 + SHM setup).
    'large_data': {'FASTDDS_BUILTIN_TRANSPORTS': 'LARGE_DATA',
                   'ROS_AUTOMATIC_DISCOVERY_RANGE': 'SYSTEM_DEFAULT'},
    # What test/conftest.py uses: default transports, discovery on this host only.
    'localhost': {'ROS_AUTOMATIC_DISCOVERY_RANGE': 'LOCALHOST'},
    'env': {},  # the environment as given
}
DDS_NOTES = {
    'large_data': 'FASTDDS_BUILTIN_TRANSPORTS=LARGE_DATA, ROS_AUTOMATIC_DISCOVERY_RANGE='
                  'SYSTEM_DEFAULT (Fast DDS only; other RMWs ignore the first)',
    'localhost': 'ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST, default transports: with '
                 'rmw_fastrtps, best-effort frames larger than its 512 KiB shared-memory '
                 'segment (raw 720p) are mostly lost, and two back-to-back frames of a few '
                 'hundred KiB evict each other',
    'env': 'the DDS environment as given (see provenance.ros_env)',
}

METHOD = (
    'One perception node process (python -m mamba_perception.ros.node, autostart) per camera '
    'count, on the same host as this benchmark, talking over real DDS (the RMW named in '
    'provenance, transports as in "dds"). This process publishes real video frames '
    '(vtest.avi resized to the benchmark size, one pre-built message per video frame, '
    'cycled; camera k starts k frames later) from one thread at rate_hz, all cameras on the '
    'same tick (phase-aligned, as synchronised cameras), each camera from its own DDS '
    'participant (rclpy context), as separate drivers. header.stamp of each message is set '
    'from the ROS clock (system time) immediately before that message\'s publish() call, so '
    'serialisation and DDS transport of the input are inside the latency. Input QoS = the '
    'node\'s input profile (best effort, keep last 1). Outputs are received by a subscription '
    'in this process (reliable, as the node\'s publishers), spun by its own executor thread; '
    'latency = ROS clock at the start of the subscription callback - header.stamp (same host '
    'clock). stamp_to_node_publish uses the DDS source timestamp of the output sample (the '
    'node\'s write time) and stamp_to_dds_receive the RMW reception timestamp, where the RMW '
    'provides them. Counted: frames stamped in [window_start, window_end) (window_start = '
    'settle_s after every camera produced its first output); outputs whose stamp is in that '
    'window, received until no output came for 2 s after it. frames_dropped = sent - '
    'received: frames replaced in the node\'s keep-newest buffer, lost by best-effort DDS '
    'and rejected as bad input, together (node_counters tells them apart). Node per-stage '
    'times and counters come from the node\'s /diagnostics (diagnostics.window_s set to the '
    'timed seconds; the last status received before window_end, whose window can reach up to '
    'diagnostics.period_s back into the settle period).')


# -- arguments and environment ---------------------------------------------------------------
def parse_size(text: str) -> tuple:
    """'1280x720' -> (width, height)."""
    match = re.fullmatch(r'(\d+)x(\d+)', text)
    if not match:
        raise argparse.ArgumentTypeError(f'{text!r} is not WIDTHxHEIGHT, e.g. 1280x720')
    return int(match.group(1)), int(match.group(2))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--device', choices=('cpu', 'cuda'), default='cuda')
    parser.add_argument('--precision', choices=('fp32', 'fp16', 'bf16'), default='fp16')
    parser.add_argument('--backbone', default='vmamba_tiny',
                        help='vmamba_tiny for the real run; vmamba_test for CPU smoke runs')
    parser.add_argument('--tasks', choices=sorted(TASKS), default='detseg')
    parser.add_argument('--cameras', type=int, nargs='+', default=[1, 2, 4],
                        help='camera counts, one node run each')
    parser.add_argument('--rate-hz', type=float, default=30.0, help='frame rate per camera')
    parser.add_argument('--seconds', type=float, default=10.0,
                        help='timed seconds per camera count')
    parser.add_argument('--settle-s', type=float, default=3.0,
                        help='seconds of publishing after the first outputs, before timing')
    parser.add_argument('--size', type=parse_size, default=(1280, 720), help='frame WxH')
    parser.add_argument('--transport', choices=('raw', 'compressed'), default='raw',
                        help='raw bgr8 Image, or JPEG CompressedImage encoded once up front')
    parser.add_argument('--cuda-graphs', action='store_true')
    parser.add_argument('--compile', action='store_true')
    parser.add_argument('--pipelined', choices=('on', 'off'), nargs='+', default=['on'],
                        help="the node's pipelined parameter; several values: each camera "
                             'count runs once per value')
    parser.add_argument('--batch-window-ms', type=float,
                        default=params.BY_NAME['batch_window_ms'].default,
                        help="the node's batch_window_ms (wait for the other cameras' frames)")
    parser.add_argument('--tiny-policy', action='store_true',
                        help='cap the network input at 64 px (CPU smoke runs)')
    parser.add_argument('--warmup-iterations', type=int, default=3)
    parser.add_argument('--frames', type=int, default=30,
                        help='video frames pre-built as messages (cycled)')
    parser.add_argument('--video', help='video file (default: find_sample_video(), vtest.avi)')
    parser.add_argument('--dds', choices=sorted(DDS_SETUPS), default='large_data',
                        help='DDS transport setup of both processes (see DDS_SETUPS)')
    parser.add_argument('--out', help='JSON output path')
    parser.add_argument('--log-dir', help='node logs (default: a new folder under /tmp)')
    parser.add_argument('--startup-timeout-s', type=float, default=300.0,
                        help='node start (bundle load, warm-up, compile) and first outputs')
    args = parser.parse_args(argv)
    if min(args.cameras) < 1 or args.rate_hz <= 0 or args.seconds <= 0:
        parser.error('--cameras, --rate-hz and --seconds must be positive')
    return args


def choose_domain_id() -> int:
    """ROS_DOMAIN_ID of this run: the environment's if set, else a random one in 1..100."""
    if os.environ.get('ROS_DOMAIN_ID'):
        return int(os.environ['ROS_DOMAIN_ID'])
    return random.randint(1, 100)


def ros_environment(domain_id: int, dds: str) -> dict:
    """Environment of this process and the node (as test/conftest.py's ros_env)."""
    env = dict(os.environ)
    env['ROS_DOMAIN_ID'] = str(domain_id)
    env.update(DDS_SETUPS[dds])
    if 'ROS_AUTOMATIC_DISCOVERY_RANGE' in DDS_SETUPS[dds]:
        env.pop('ROS_LOCALHOST_ONLY', None)  # deprecated; conflicts with the range setting
    env['PYTHONUNBUFFERED'] = '1'  # the node log is complete when we read its tail
    return env


# -- inputs: bundle and frames -----------------------------------------------------------------
def make_bundle(args, folder: Path) -> Path:
    """Random-weight bundle (full-size heads unless a *_test backbone) in ``folder``."""
    from mamba_perception.models.bundle import create_random_bundle
    path = folder / f'{args.backbone}_{args.tasks}.safetensors'
    create_random_bundle(path, backbone=args.backbone, tasks=TASKS[args.tasks],
                         class_names=CLASS_NAMES,
                         input_policy=TINY_POLICY if args.tiny_policy else None)
    return path


def load_frames_bgr(video: Path, count: int, width: int, height: int) -> list:
    """``count`` consecutive real video frames, BGR, resized to exactly width x height."""
    import cv2

    from mamba_perception.replay.sample import read_frames
    frames = []
    for _, rgb in read_frames(video, count=count):
        shrink = rgb.shape[1] > width or rgb.shape[0] > height
        resized = cv2.resize(rgb, (width, height),
                             interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        frames.append(cv2.cvtColor(resized, cv2.COLOR_RGB2BGR))
    return frames


def build_messages(frames_bgr: list, transport: str) -> list:
    """One input message per frame; header (stamp, frame_id) is filled in at publish time."""
    import cv2
    from sensor_msgs.msg import CompressedImage
    from std_msgs.msg import Header

    from mamba_perception.ros.conversions import array_to_image
    messages = []
    for bgr in frames_bgr:
        if transport == 'compressed':
            ok, jpeg = cv2.imencode('.jpg', bgr, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
            if not ok:
                raise RuntimeError('OpenCV could not JPEG-encode a frame')
            # array.array('B') is rclpy's fast path for uint8[] fields (a list would be slow).
            msg = CompressedImage(format='bgr8; jpeg compressed bgr8',
                                  data=array.array('B', jpeg.tobytes()))
        else:
            msg = array_to_image(bgr, Header(), 'bgr8')
        messages.append(msg)
    return messages


def message_bytes(messages: list) -> int:
    return int(np.mean([len(m.data) for m in messages]))


# -- the node process --------------------------------------------------------------------------
def ros_value(value) -> str:
    """Format a ``-p name:=value`` value with the type the node declares (float stays float)."""
    if isinstance(value, bool):
        return 'true' if value else 'false'
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return '[' + ', '.join(ros_value(v) for v in value) + ']'
    return str(value)


def node_parameters(args, cameras: list, bundle: Path, pipelined: bool = True) -> dict:
    width, height = args.size
    warmup_hw = TINY_WARMUP_HW if args.tiny_policy else (height, width)
    return {
        'cameras': cameras, 'input_transport': args.transport, 'bundle_path': str(bundle),
        'device': args.device, 'precision': args.precision, 'cuda_graphs': args.cuda_graphs,
        'compile': args.compile, 'pipelined': pipelined, 'warmup_size_px': list(warmup_hw),
        'batch_window_ms': float(args.batch_window_ms),
        'warmup_iterations': args.warmup_iterations, 'diagnostics.period_s': 1.0,
        'diagnostics.expected_rate_hz': float(args.rate_hz),
        # The last status of the timed window then covers (about) the whole window.
        'diagnostics.window_s': float(min(max(args.seconds, 0.5), 600.0)),
    }


def node_argv(parameters: dict) -> list:
    argv = [sys.executable, '-m', 'mamba_perception.ros.node', '--ros-args']
    for name, value in parameters.items():
        argv += ['-p', f'{name}:={ros_value(value)}']
    return argv


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


class NodeProcess:
    """The perception node as an OS process in its own session; output goes to a log file."""

    def __init__(self, argv: list, env: dict, log_path: Path) -> None:
        self.argv = argv
        self.log_path = log_path
        self._log = open(log_path, 'wb')
        self.started = time.monotonic()
        self.proc = subprocess.Popen(argv, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors='replace')[-chars:]

    def check_alive(self, doing: str) -> None:
        if not self.alive():
            raise RuntimeError(f'the node exited with code {self.proc.returncode} while '
                               f'{doing}; log tail:\n{self.log_tail()}')

    def stop(self) -> dict:
        """SIGINT (as ros2 launch and Ctrl-C), up to STOP_TIMEOUT_S, then SIGKILL; reaps."""
        how = 'already exited'
        started = time.monotonic()
        if self.alive():
            how = 'sigint'
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                how = f'killed (no exit within {STOP_TIMEOUT_S:g} s of SIGINT)'
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10.0)
        self._log.close()
        return {'stopped_by': how, 'exit_code': self.proc.returncode,
                'exited': self.proc.poll() is not None, 'stop_s': time.monotonic() - started}


def warmup_seconds_from_log(text: str):
    """Read the warm-up seconds from the node's 'warmed up at HxW xN in S s' log line."""
    match = re.search(r'warmed up at \S+ x\d+ in ([\d.]+) s', text)
    return float(match.group(1)) if match else None


# -- this process's ROS side -------------------------------------------------------------------
class Probe:
    """rclpy node of this benchmark: input publishers, output and /diagnostics subscriptions.

    Callbacks run on an executor in its own thread; they only append to lists (atomic under
    the GIL) so the publishing thread is disturbed as little as possible.
    """

    def __init__(self, context, cameras: list, transport: str, tasks: tuple) -> None:
        import rclpy
        from rclpy.executors import SingleThreadedExecutor
        from sensor_msgs.msg import CompressedImage, Image
        from vision_msgs.msg import Detection2DArray

        from mamba_perception.ros import qos
        self.node = rclpy.create_node('node_dds_bench', context=context)
        self.clock = self.node.get_clock()
        self.cameras = cameras
        compressed = transport == 'compressed'
        in_type = CompressedImage if compressed else Image
        # Each camera publishes from its own context (DDS participant), as separate camera
        # drivers do: with one participant writing four raw 720p frames back to back, the
        # first camera lost frames before the node (Fast DDS, LARGE_DATA: ~3 % on an H200
        # host, ~20 % on the development machine, bench/dds_burst.py; none with one
        # participant per camera or 2 ms between the writes; the reader's depth did not matter).
        self._camera_contexts, self._camera_nodes, self.publishers = [], [], {}
        for cam in cameras:
            camera_context = rclpy.Context()
            camera_context.init()
            camera_node = rclpy.create_node(f'node_dds_bench_{cam}', context=camera_context)
            self._camera_contexts.append(camera_context)
            self._camera_nodes.append(camera_node)
            self.publishers[cam] = camera_node.create_publisher(
                in_type, f'{cam}/image/compressed' if compressed else f'{cam}/image',
                qos.input_qos('best_effort', 1))
        self.kinds = [kind for kind, task in (('detections', 'detection'),
                                              ('masks', 'segmentation')) if task in tasks]
        types = {'detections': Detection2DArray, 'masks': Image}
        out_qos = qos.output_qos(OUTPUT_READER_DEPTH)
        # (stamp_ns, callback_ns, dds_source_ns, dds_received_ns) per (camera, kind)
        self.received = {(cam, kind): [] for cam in cameras for kind in self.kinds}
        self.subscriptions = [
            self.node.create_subscription(
                types[kind], f'{cam}/{OUTPUT_KINDS[kind]}',
                lambda msg, info, key=(cam, kind): self._on_output(key, msg, info), out_qos)
            for cam in cameras for kind in self.kinds]
        self.diagnostics = []  # (callback_ns, camera, level, message, values)
        self.node.create_subscription(self._diagnostic_type(), '/diagnostics',
                                      self._on_diagnostics, qos.DIAGNOSTICS_QOS)
        self.executor = SingleThreadedExecutor(context=context)
        self.executor.add_node(self.node)
        self._spinner = threading.Thread(target=self._spin, name='probe-executor', daemon=True)
        self._spinner.start()

    @staticmethod
    def _diagnostic_type():
        from diagnostic_msgs.msg import DiagnosticArray
        return DiagnosticArray

    def _spin(self) -> None:
        from rclpy.executors import ExternalShutdownException
        try:
            self.executor.spin()
        except ExternalShutdownException:
            pass

    def now_ns(self) -> int:
        return self.clock.now().nanoseconds

    def _on_output(self, key, msg, info) -> None:
        now = self.now_ns()  # first thing: the receive time of this sample
        stamp = msg.header.stamp.sec * NS + msg.header.stamp.nanosec
        self.received[key].append((stamp, now, int(info['source_timestamp']),
                                   int(info['received_timestamp'])))

    def _on_diagnostics(self, msg) -> None:
        now = self.now_ns()
        for status in msg.status:
            name, _, camera = status.name.rpartition(': camera ')
            if not name or camera not in self.cameras:
                continue
            level = status.level
            level = level[0] if isinstance(level, (bytes, bytearray)) else int(level)
            self.diagnostics.append((now, camera, level, status.message,
                                     {kv.key: kv.value for kv in status.values}))

    def connected(self) -> bool:
        """Tell whether the node subscribes every input and we hear every output of it."""
        return (all(p.get_subscription_count() > 0 for p in self.publishers.values())
                and all(s.get_publisher_count() > 0 for s in self.subscriptions))

    def first_outputs_seen(self) -> bool:
        return all(len(records) > 0 for records in self.received.values())

    def close(self) -> None:
        self.executor.shutdown(timeout_sec=5.0)
        self._spinner.join(5.0)
        self.node.destroy_node()
        for camera_node, camera_context in zip(self._camera_nodes, self._camera_contexts,
                                               strict=True):
            camera_node.destroy_node()
            camera_context.try_shutdown()


class TickPublisher(threading.Thread):
    """Publishes every camera's next frame at each tick of ``rate_hz``, cameras in order.

    Like a camera, it never bursts to catch up: ticks missed by more than a period are skipped
    (and counted).
    """

    def __init__(self, probe: Probe, messages: list, rate_hz: float) -> None:
        super().__init__(name='tick-publisher', daemon=True)
        self.probe = probe
        self.messages = messages
        self.period_ns = int(NS / rate_hz)
        self.stop_event = threading.Event()
        self.sent = {cam: [] for cam in probe.cameras}  # stamp_ns of each published frame
        self.publish_call_ms = []
        self.tick_lateness_ms = []
        self.skipped_ticks = 0
        self.error = None

    def run(self) -> None:
        try:
            self._loop()
        except Exception as exc:  # noqa: BLE001 - reported by the camera-count run
            self.error = f'{type(exc).__name__}: {exc}'

    def _loop(self) -> None:
        from builtin_interfaces.msg import Time
        cameras = self.probe.cameras
        frame_ids = {cam: f'{cam}_optical_frame' for cam in cameras}
        tick = 0
        next_tick = time.monotonic_ns()
        while not self.stop_event.is_set():
            late = time.monotonic_ns() - next_tick
            if late >= self.period_ns:
                missed = late // self.period_ns
                self.skipped_ticks += missed
                tick += missed
                next_tick += missed * self.period_ns
                late -= missed * self.period_ns
            self.tick_lateness_ms.append(late / 1e6)
            for k, cam in enumerate(cameras):
                msg = self.messages[(tick + k) % len(self.messages)]
                # One message object may serve several cameras: publish() serialises at once,
                # so setting the header right before it is safe.
                msg.header.frame_id = frame_ids[cam]
                started = time.perf_counter()
                stamp = self.probe.now_ns()
                msg.header.stamp = Time(sec=stamp // NS, nanosec=stamp % NS)
                self.probe.publishers[cam].publish(msg)
                self.publish_call_ms.append((time.perf_counter() - started) * 1e3)
                self.sent[cam].append(stamp)
            tick += 1
            next_tick += self.period_ns
            self.stop_event.wait(max(0.0, (next_tick - time.monotonic_ns()) / NS))


# -- statistics --------------------------------------------------------------------------------
def stats_ms(values) -> dict:
    values = np.asarray(values, np.float64)
    if values.size == 0:
        return {'count': 0}
    p50, p90, p99 = np.percentile(values, (50, 90, 99))
    return {'count': int(values.size), 'p50': float(p50), 'p90': float(p90),
            'p99': float(p99), 'max': float(values.max()), 'mean': float(values.mean())}


def in_window(stamps, start_ns: int, end_ns: int) -> list:
    return [s for s in stamps if start_ns <= s < end_ns]


def diag_float(values: dict, key: str):
    try:
        number = float(values[key])
    except (KeyError, ValueError):
        return None
    return None if math.isnan(number) else number


def diag_int(values: dict, key: str):
    number = diag_float(values, key)
    return None if number is None else int(number)


def last_status(diagnostics: list, camera: str, until_ns: int, since_ns: int = 0):
    """Last (callback_ns, level, message, values) of ``camera`` received in [since, until]."""
    for received_ns, cam, level, message, values in reversed(diagnostics):
        if cam == camera and since_ns <= received_ns <= until_ns:
            return received_ns, level, message, values
    return None


def output_summary(probe: Probe, sent: dict, start_ns: int, end_ns: int,
                   seconds: float) -> dict:
    """Received counts, drops, latencies and rates per output kind, from stamps in the window."""
    out = {}
    for kind in probe.kinds:
        per_camera, all_latency, all_node_publish, all_dds = {}, [], [], []
        for cam in probe.cameras:
            records = [r for r in probe.received[(cam, kind)] if start_ns <= r[0] < end_ns]
            unique = {r[0]: r for r in records}  # a stamp received twice counts once
            latency = [(r[1] - r[0]) / 1e6 for r in unique.values()]
            node_publish = [(r[2] - r[0]) / 1e6 for r in unique.values() if r[2] > 0]
            dds = [(r[3] - r[0]) / 1e6 for r in unique.values() if r[3] > 0]
            all_latency += latency
            all_node_publish += node_publish
            all_dds += dds
            per_camera[cam] = {
                'received': len(unique), 'duplicates': len(records) - len(unique),
                'dropped': sent[cam] - len(unique),
                'output_rate_hz': len(unique) / seconds,
                'latency_ms': stats_ms(latency)}
        received = sum(c['received'] for c in per_camera.values())
        out[kind] = {
            'received': received, 'dropped': sum(sent.values()) - received,
            'drop_fraction': 1.0 - received / max(1, sum(sent.values())),
            'latency_ms': stats_ms(all_latency),
            'stamp_to_node_publish_ms': stats_ms(all_node_publish),
            'stamp_to_dds_receive_ms': stats_ms(all_dds),
            'per_camera': per_camera}
    return out


def diagnostics_summary(probe: Probe, start_ns: int, end_ns: int) -> dict:
    """Per camera: the node's last status in the window, its stages, counter deltas."""
    out = {}
    for cam in probe.cameras:
        last = last_status(probe.diagnostics, cam, end_ns, start_ns)
        if last is None:
            out[cam] = {'error': 'no /diagnostics status of this camera in the timed window'}
            continue
        received_ns, level, message, values = last
        before = last_status(probe.diagnostics, cam, start_ns)
        entry = {
            'level': level, 'message': message,
            'received_s_into_window': (received_ns - start_ns) / NS,
            'stages_ms': {stage: {'p50': diag_float(values, f'{stage} p50 (ms)'),
                                  'p99': diag_float(values, f'{stage} p99 (ms)')}
                          for stage in STAGES},
            'latency_p50_ms': diag_float(values, 'latency p50 (ms)'),
            'latency_p99_ms': diag_float(values, 'latency p99 (ms)'),
            'frames_dropped_total': diag_int(values, 'frames dropped'),
            'values': values}
        if before is not None:
            # Counter differences between two statuses: the node's view of (about) the window.
            deltas = {}
            for key in ('frames received', 'frames published', 'frames dropped', 'bad inputs'):
                end, begin = diag_int(values, key), diag_int(before[3], key)
                deltas[key.replace(' ', '_')] = (None if end is None or begin is None
                                                 else end - begin)
            deltas['between_statuses_s'] = (received_ns - before[0]) / NS
            entry['counters_between_statuses'] = deltas
        out[cam] = entry
    return out


def node_counters(diagnostics: dict, sent_total: int) -> dict:
    """Sum the node's counters over (about) the window over cameras; compare with frames sent."""
    deltas = [d.get('counters_between_statuses') for d in diagnostics.values()]
    if not deltas or any(d is None for d in deltas):
        return {'error': 'no pair of /diagnostics statuses around the window for every camera'}
    total = {}
    for key in ('frames_received', 'frames_published', 'frames_dropped', 'bad_inputs'):
        values = [d[key] for d in deltas]
        total[key] = None if None in values else sum(values)
    if total['frames_received'] is not None:
        # Frames published here that the node's subscription never saw: lost in DDS.
        total['sent_minus_node_received'] = sent_total - total['frames_received']
    total['note'] = ('differences of the node\'s cumulative counters between its last status '
                     'before the window and its last status in it: the same length as the window '
                     'but shifted by up to diagnostics.period_s')
    return total


def publisher_summary(publisher: TickPublisher) -> dict:
    return {'publish_call_ms': stats_ms(publisher.publish_call_ms),
            'tick_lateness_ms': stats_ms(publisher.tick_lateness_ms),
            'skipped_ticks': publisher.skipped_ticks, 'error': publisher.error}


# -- one camera count --------------------------------------------------------------------------
def wait_for(predicate, timeout_s: float, node: NodeProcess, what: str) -> float:
    """Wait until ``predicate()``; seconds waited. Raises when the node dies or on timeout."""
    started = time.monotonic()
    while not predicate():
        node.check_alive(f'waiting for {what}')
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(f'timed out after {timeout_s:g} s waiting for {what}; node log '
                               f'tail:\n{node.log_tail()}')
        time.sleep(0.05)
    return time.monotonic() - started


def drain_outputs(probe: Probe, node: NodeProcess) -> float:
    """Wait for outputs still in flight: until none came for DRAIN_QUIET_S (or DRAIN_MAX_S)."""
    started = time.monotonic()
    last_count, last_change = -1, started
    while time.monotonic() - started < DRAIN_MAX_S:
        count = sum(len(r) for r in probe.received.values())
        if count != last_count:
            last_count, last_change = count, time.monotonic()
        elif time.monotonic() - last_change >= DRAIN_QUIET_S:
            break
        if not node.alive():
            break
        time.sleep(0.05)
    return time.monotonic() - started


def run_camera_count(n: int, args, context, bundle: Path, messages: list, env: dict,
                     log_path: Path, pipelined: bool = True) -> dict:
    """Start a node for ``n`` cameras, feed it, measure; always stops the node."""
    cameras = [f'cam{i}' for i in range(n)]
    parameters = node_parameters(args, cameras, bundle, pipelined)
    result = {'cameras': n, 'pipelined': pipelined, 'node_parameters': parameters,
              'node_log': str(log_path)}
    node = NodeProcess(node_argv(parameters), env, Path(result['node_log']))
    probe = publisher = None
    try:
        probe = Probe(context, cameras, args.transport, TASKS[args.tasks])
        wait_for(probe.connected, args.startup_timeout_s, node,
                 'the node to subscribe every input and publish every output')
        result['node_startup_s'] = time.monotonic() - node.started
        result['node_warmup_s_from_log'] = warmup_seconds_from_log(node.log_tail(1 << 20))
        publisher = TickPublisher(probe, messages, args.rate_hz)
        publisher.start()
        # Partial batches and first frames may still compile or capture; time nothing before
        # every camera has produced output, then settle.
        result['first_outputs_s'] = wait_for(probe.first_outputs_seen, args.startup_timeout_s,
                                             node, 'the first outputs of every camera')
        time.sleep(args.settle_s)
        node.check_alive('settling')
        start_ns = probe.now_ns()
        deadline = time.monotonic() + args.seconds
        while time.monotonic() < deadline:
            node.check_alive('the timed window')
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        end_ns = probe.now_ns()
        publisher.stop_event.set()
        publisher.join(10.0)
        seconds = (end_ns - start_ns) / NS
        result['timed_window_s'] = seconds
        result['drain_s'] = drain_outputs(probe, node)
        sent = {cam: len(in_window(publisher.sent[cam], start_ns, end_ns)) for cam in cameras}
        result['frames_sent'] = {'total': sum(sent.values()), 'per_camera': sent}
        result['outputs'] = output_summary(probe, sent, start_ns, end_ns, seconds)
        result['publisher'] = publisher_summary(publisher)
        result['diagnostics'] = diagnostics_summary(probe, start_ns, end_ns)
        result['node_counters'] = node_counters(result['diagnostics'],
                                                result['frames_sent']['total'])
        node.check_alive('draining outputs')
        result['ok'] = True
    except Exception as exc:  # noqa: BLE001 - recorded; the next camera count still runs
        result['ok'] = False
        result['error'] = f'{type(exc).__name__}: {exc}'
        result['traceback'] = traceback.format_exc()
        result['node_log_tail'] = node.log_tail()
    finally:
        if publisher is not None:
            publisher.stop_event.set()
            publisher.join(10.0)
        result['node_stop'] = node.stop()
        if probe is not None:
            probe.close()
    if result['ok'] and result['node_stop']['exit_code'] != 0:
        result['node_stop']['warning'] = 'the node did not exit cleanly; see its log'
    return result


# -- report ------------------------------------------------------------------------------------
def node_overhead(results: list) -> dict:
    """Decode + publish stage p50 (the node's work beyond Pipeline), from /diagnostics."""
    runs = []
    for result in results:
        per_camera = [d for d in result.get('diagnostics', {}).values() if 'stages_ms' in d]
        decode = [d['stages_ms']['decode']['p50'] for d in per_camera
                  if d['stages_ms']['decode']['p50'] is not None]
        publish = [d['stages_ms']['publish']['p50'] for d in per_camera
                   if d['stages_ms']['publish']['p50'] is not None]
        entry = {'cameras': result['cameras'], 'decode_p50_ms': None, 'publish_p50_ms': None,
                 'decode_plus_publish_p50_ms': None}
        if decode and publish:
            entry.update(decode_p50_ms=float(np.mean(decode)),
                         publish_p50_ms=float(np.mean(publish)),
                         decode_plus_publish_p50_ms=float(np.mean(decode) + np.mean(publish)))
        runs.append(entry)
    return {'source': "read from the node's /diagnostics (its own stage timers; mean over "
                      "cameras of each camera's p50): decode = input message to RGB frame (on "
                      'the device for CUDA), publish = building and publishing the output '
                      'messages. Timed inside the node, not by this process.',
            'runs': runs}


def cpu_model() -> str:
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(args, domain_id: int, env: dict, video: Path) -> dict:
    import importlib.metadata

    from rclpy.utilities import get_rmw_implementation_identifier
    import torch
    try:
        rclpy_version = importlib.metadata.version('rclpy')
    except importlib.metadata.PackageNotFoundError:
        rclpy_version = None
    try:
        commit = subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True,
                                check=True, cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    cuda = args.device == 'cuda' and torch.cuda.is_available()
    return {
        'date_utc': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
        'command': ' '.join([os.path.basename(sys.executable), *sys.argv]),
        'host': platform.node(), 'python': platform.python_version(),
        'torch': torch.__version__, 'rclpy': rclpy_version, 'git_commit': commit,
        'device_name': torch.cuda.get_device_name(0) if cuda else cpu_model(),
        'cpu_model': cpu_model(), 'cpu_count': os.cpu_count(),
        'rmw_implementation': get_rmw_implementation_identifier(), 'ros_domain_id': domain_id,
        'ros_env': {k: v for k, v in env.items()
                    if k.startswith(('ROS_', 'RMW_', 'FASTDDS', 'FASTRTPS', 'CYCLONEDDS'))},
        'video': str(video), 'args': {k: (list(v) if isinstance(v, tuple) else v)
                                      for k, v in vars(args).items()},
    }


def fmt(value, digits: int = 1) -> str:
    return '-' if value is None else f'{value:.{digits}f}'


def print_summary(report: dict) -> None:
    header = (f'{"cams":>4} {"pipe":>4} {"start s":>8} {"sent":>6} {"recv":>6} {"drop%":>6} '
              f'{"det p50":>8} {"det p99":>8} {"mask p50":>9} {"mask p99":>9} {"Hz/cam":>7} '
              f'{"infer p50":>9} {"dec+pub":>8}  level')
    print('\nstamp-to-receive latency over DDS (ms); node stage times from /diagnostics (ms)')
    print(header)
    overhead = report['node_overhead_ms']['runs']
    for result, node_work in zip(report['results'], overhead, strict=True):
        n = result['cameras']
        if not result.get('ok'):
            print(f'{n:>4} failed: {result.get("error", "")[:100]}')
            continue
        outputs = result['outputs']
        primary = outputs.get('detections') or outputs.get('masks')
        det = outputs.get('detections', {}).get('latency_ms', {})
        mask = outputs.get('masks', {}).get('latency_ms', {})
        rates = [c['output_rate_hz'] for c in primary['per_camera'].values()]
        diags = [d for d in result['diagnostics'].values() if 'stages_ms' in d]
        infer = [d['stages_ms']['inference']['p50'] for d in diags
                 if d['stages_ms']['inference']['p50'] is not None]
        level = max((d['level'] for d in diags), default=None)
        print(f'{n:>4} {"on" if result.get("pipelined", True) else "off":>4} '
              f'{fmt(result["node_startup_s"]):>8} {result["frames_sent"]["total"]:>6} '
              f'{primary["received"]:>6} {100 * primary["drop_fraction"]:>6.1f} '
              f'{fmt(det.get("p50")):>8} {fmt(det.get("p99")):>8} '
              f'{fmt(mask.get("p50")):>9} {fmt(mask.get("p99")):>9} '
              f'{fmt(float(np.mean(rates))):>7} '
              f'{fmt(float(np.mean(infer)) if infer else None, 2):>9} '
              f'{fmt(node_work["decode_plus_publish_p50_ms"], 2):>8}  '
              f'{ {0: "OK", 1: "WARN", 2: "ERROR"}.get(level, level)}')


def write_report(report: dict, path) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(report, indent=1) + '\n')


def main(argv=None) -> int:
    args = parse_args(argv)
    domain_id = choose_domain_id()
    env = ros_environment(domain_id, args.dds)
    # This process must join with the same DDS settings as the node.
    os.environ.update(env)
    if 'ROS_LOCALHOST_ONLY' not in env:
        os.environ.pop('ROS_LOCALHOST_ONLY', None)
    import rclpy
    from rclpy.signals import SignalHandlerOptions

    from mamba_perception.replay.sample import find_sample_video
    video = Path(args.video) if args.video else find_sample_video()
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix='node_dds_logs_'))
    log_dir.mkdir(parents=True, exist_ok=True)
    width, height = args.size
    frames = load_frames_bgr(video, args.frames, width, height)
    messages = build_messages(frames, args.transport)
    report = {'benchmark': 'node_dds', 'method': METHOD,
              'dds': DDS_NOTES[args.dds],
              'stamps': 'header.stamp = ROS clock (system time) read immediately before each '
                        "camera's publish(); all cameras published on the same tick, in order",
              'provenance': provenance(args, domain_id, env, video),
              'inputs': {'frames': len(frames), 'size_wh': [width, height],
                         'transport': args.transport,
                         'message_bytes_mean': message_bytes(messages),
                         'frames_from': f'{video.name}, resized (aspect not kept) to {width}x'
                                        f'{height}' + (f', JPEG quality {JPEG_QUALITY}' if
                                                       args.transport == 'compressed' else '')},
              'log_dir': str(log_dir), 'results': []}
    # No rclpy signal handlers: Ctrl-C must raise here so the node process gets stopped. The
    # node runs in its own session, so a SIGTERM to this process (`timeout`, as the device plan
    # runs it) does not reach it: raise here too, and the finally blocks stop it (else it was
    # left running, on the GPU, through the next steps).
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=domain_id,
               signal_handler_options=SignalHandlerOptions.NO)
    try:
        with tempfile.TemporaryDirectory(prefix='node_dds_bundle_') as folder:
            started = time.perf_counter()
            bundle = make_bundle(args, Path(folder))
            report['bundle'] = {'backbone': args.backbone, 'tasks': list(TASKS[args.tasks]),
                                'classes': len(CLASS_NAMES), 'random_weights': True,
                                'tiny_policy': args.tiny_policy,
                                'create_s': time.perf_counter() - started}
            runs = [(n, mode == 'on') for n in args.cameras for mode in args.pipelined]
            for run, (n, pipelined) in enumerate(runs):
                log_path = log_dir / f'node_run{run}_{n}cam.log'
                print(f'--- {n} camera(s), pipelined={pipelined}: starting the node '
                      f'(log {log_path})', flush=True)
                result = run_camera_count(n, args, context, bundle, messages, env, log_path,
                                          pipelined)
                report['results'].append(result)
                report['node_overhead_ms'] = node_overhead(report['results'])
                write_report(report, args.out)  # partial results survive a later crash
                print(f'    {"ok" if result["ok"] else "FAILED: " + result["error"][:300]}',
                      flush=True)
    finally:
        rclpy.try_shutdown(context=context)
    report['node_overhead_ms'] = node_overhead(report['results'])
    write_report(report, args.out)
    print_summary(report)
    if args.out:
        print(f'\nwrote {args.out}')
    return 0 if all(r['ok'] for r in report['results']) else 1


if __name__ == '__main__':
    sys.exit(main())
