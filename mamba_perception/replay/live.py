r"""Live mode: play a bag's camera topics into a running perception node over DDS and measure it.

Offline replay (:mod:`.evaluate`) answers accuracy and per-stage latency deterministically; live
mode answers what the running system does. The bag's camera messages are published at their
recorded spacing divided by ``rate`` on the bag's own topic names (as ``ros2 bag play`` does),
into a ``perception_node`` that is either started here as a real process (remapped the way
``launch/av.launch.py`` remaps it: ``<cam>/image:=<bag topic>``) or already running. The node's
outputs (``<ns>/<cam>/detections``, ``<ns>/<cam>/segmentation/mask``, ``<ns>/<cam>/label_info``
and ``/diagnostics``) are recorded and then scored with the same accumulators as offline replay.

Time
----
* **Sim time** (a node started here runs with ``use_sim_time:=true`` unless told otherwise; for
  a running node its ``use_sim_time`` parameter is asked over its parameter service): frames
  keep their recorded header stamps and ``/clock`` is published. When the bag has a ``/clock``
  topic, its messages are played with the frames. When it has none, ``/clock`` is generated
  from the bag's **log times** (the recorder's receive times, the timeline ``ros2 bag play``
  publishes with ``--clock``): ``clock_hz`` times per second the value
  ``first log time + elapsed wall time * rate``, and exactly the frame's log time just before
  each frame. A one-second pre-roll before the first frame and the drain after the last keep
  the clock running, so the node's timers (its diagnostics) fire.
* **Wall time** (the node runs without sim time): no ``/clock``; each frame is re-stamped with
  its place on the replay timeline (``start + (stamp - first log time) / rate``, system clock),
  so the node's own latency diagnostics stay meaningful; outputs are mapped back to the
  recorded stamps for accuracy.

Measurements
------------
* **stamp-to-publish latency**: the node clock at the moment the node published a frame's
  outputs minus the frame's stamp as the node saw it (what the node's diagnostics compute).
  The publish moment is the DDS source timestamp of the output message (system clock, same
  host); the node clock then is that time itself (wall time) or the ``/clock`` timeline
  published here, interpolated between its messages (sim time; in sim-time units, so ``rate``
  scales it).
* **input-to-output latency**: output publish time minus the time this process published the
  frame, both system clock: the node's wall-clock cost per frame, whatever the rate.
* **drops**: frames published here that got no output. The node's own counters (frames
  received, published, dropped by its one-slot buffer, bad inputs; from ``/diagnostics``,
  relative to the last report before the first frame) say where they went: lost before the
  node (DDS), replaced in the buffer, or refused.
* **output rate**: outputs received over the span from the first to the last output.
* Accuracy is computed over the frames whose outputs came back, paired with ground truth by the
  recorded stamp exactly as offline.

This is the only replay module that imports rclpy, and only inside its functions.
"""

from __future__ import annotations

import array
from dataclasses import dataclass, field
import json
import logging
import os
from pathlib import Path
import shutil
import signal
import struct
import subprocess
import sys
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np

from mamba_perception.errors import BagError, ParameterError, SetupError
from mamba_perception.replay.bag import (
    CAMERA_TYPES,
    COMPRESSED_TYPE,
    IMAGE_TYPE,
    BagReader,
    decode_detections,
    decode_image,
    decode_mask,
    header_stamp_ns,
)
from mamba_perception.replay.evaluate import (
    Evaluation,
    FrameTruth,
    GroundTruth,
    overlay_png,
    score_frame,
)
from mamba_perception.replay.metrics import latency_stats
from mamba_perception.results import Detections, FrameResult
from mamba_perception.ros.topics import camera_name_from_topic

log = logging.getLogger(__name__)

CLOCK_TYPE = 'rosgraph_msgs/msg/Clock'
NODE_NAME = 'mamba_perception'
NODE_EXECUTABLE = 'perception_node'
NS = 1_000_000_000
COUNTER_KEYS = {'frames received': 'frames_received', 'frames published': 'frames_published',
                'frames dropped': 'frames_dropped', 'bad inputs': 'bad_inputs'}


class LiveError(SetupError):
    """The node could not be started or reached, or it died during the run."""


@dataclass
class LiveOptions:
    """How to play the bag and where the node is."""

    rate: float = 1.0
    sim_time: Optional[bool] = None  # None: True for a node started here, asked of a running one
    clock_hz: float = 100.0
    node_name: str = NODE_NAME
    namespace: str = ''
    cameras: Sequence[str] = ()  # camera names in topic order, or 'TOPIC=NAME'
    input_transport: Optional[str] = None  # 'raw' / 'compressed'; None: from the topic types
    wait_for_node_s: float = 120.0
    preroll_s: float = 1.0
    drain_s: float = 3.0
    max_frames: Optional[int] = None
    overlays: int = 6

    def __post_init__(self) -> None:
        """Reject values that cannot work."""
        if not self.rate > 0:
            raise ParameterError(f'--rate must be > 0, got {self.rate}')
        if not self.clock_hz > 0:
            raise ParameterError(f'clock_hz must be > 0, got {self.clock_hz}')
        if self.input_transport not in (None, 'raw', 'compressed'):
            raise ParameterError(f"input transport must be 'raw' or 'compressed', got "
                                 f'{self.input_transport!r}')

    @property
    def node_fqn(self) -> str:
        """Fully qualified node name: ``/perception/mamba_perception``."""
        return _join(self.namespace, self.node_name)


# --------------------------------------------------------------------------------------------
# Cameras and topics

def _join(*parts: str) -> str:
    return '/' + '/'.join(p.strip('/') for p in parts if p.strip('/'))


def select_cameras(reader: BagReader, topics: Sequence[str], exclude: Sequence[str],
                   options: LiveOptions) -> tuple[list[tuple[str, str]], str]:
    """``([(bag topic, camera name), ...], input transport)`` for the node.

    Without ``topics``: every camera topic of the bag except ``exclude`` (ground truth); when
    the bag has both raw and compressed ones, those of ``options.input_transport`` (default raw)
    as the node takes one transport for all cameras.
    """
    chosen = [t for t in (list(topics) or reader.camera_topics()) if t not in set(exclude)]
    if not chosen:
        raise BagError(f'{reader.path}: no camera topics (sensor_msgs/Image or CompressedImage)'
                       f'; topics: {reader.topics}')
    reader.require_topics(chosen, CAMERA_TYPES)
    kind = {t: 'compressed' if reader.topics[t] == COMPRESSED_TYPE else 'raw' for t in chosen}
    transport = options.input_transport
    if transport is None:
        kinds = set(kind.values())
        transport = kinds.pop() if len(kinds) == 1 else 'raw'
    if not topics:
        chosen = [t for t in chosen if kind[t] == transport]
    wrong = [t for t in chosen if kind[t] != transport]
    if wrong or not chosen:
        raise ParameterError(f'the node reads one input transport ({transport}) for all cameras;'
                             f' {", ".join(wrong) or "no topic"} does not fit: choose topics of '
                             'one type with --topics')
    names: list[str] = []
    by_topic = dict(item.split('=', 1) for item in options.cameras if '=' in item)
    plain = [item for item in options.cameras if '=' not in item]
    if plain and len(plain) != len(chosen):
        raise ParameterError(f'--cameras gives {len(plain)} names for {len(chosen)} topics '
                             f'({", ".join(chosen)})')
    for i, topic in enumerate(chosen):
        names.append(by_topic.get(topic) or (plain[i] if plain else
                                             camera_name_from_topic(topic, i)))
    if len(set(names)) != len(names):
        names = [f'{name}{i}' for i, name in enumerate(names)]
    return list(zip(chosen, names, strict=True)), transport


# --------------------------------------------------------------------------------------------
# The node as a process

class NodeProcess:
    """``perception_node`` started as an OS process in its own session; output to a log file."""

    def __init__(self, argv: list, env: Optional[dict] = None,
                 log_path: Optional[os.PathLike | str] = None) -> None:
        self.argv = [str(a) for a in argv]
        self.log_path = Path(log_path) if log_path else None
        self._log = open(self.log_path, 'wb') if self.log_path else subprocess.DEVNULL
        env = {**os.environ, 'PYTHONUNBUFFERED': '1', **(env or {})}
        self.proc = subprocess.Popen(self.argv, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def alive(self) -> bool:
        """Return True while the process runs."""
        return self.proc.poll() is None

    def output_tail(self, chars: int = 4000) -> str:
        """Return the end of the node's log (empty without a log file)."""
        if self.log_path is None:
            return ''
        if not isinstance(self._log, int) and not self._log.closed:
            self._log.flush()
        try:
            return self.log_path.read_text(errors='replace')[-chars:]
        except OSError:
            return ''

    def stop(self, timeout_s: float = 10.0) -> Optional[int]:
        """SIGINT to its process group (what Ctrl-C sends), then SIGKILL; always reaps."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGINT)
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            except ProcessLookupError:
                pass
        if not isinstance(self._log, int) and not self._log.closed:
            self._log.close()
        return self.proc.returncode


def node_executable() -> Path:
    """Path of ``perception_node`` where ``ros2 run`` finds it, else on PATH."""
    path = Path(sys.prefix) / 'lib' / 'mamba_perception' / NODE_EXECUTABLE
    if path.exists():
        return path
    found = shutil.which(NODE_EXECUTABLE)
    if found:
        return Path(found)
    raise LiveError(f'{NODE_EXECUTABLE} not found at {path} nor on PATH: install the package '
                    '(tools/dev setup) or start the node yourself and use --node-already-running')


def node_argv(bundle: os.PathLike | str, cameras: Sequence[tuple[str, str]], transport: str,
              sim_time: bool, options: LiveOptions, device: Optional[str] = None,
              precision: Optional[str] = None, params: Sequence[str] = ()) -> list:
    """Command line of a node for ``cameras`` [(bag topic, name)], remapped as av.launch.py does.

    ``params`` are extra ``name:=value`` parameters, given last (they win).
    """
    suffix = 'image/compressed' if transport == 'compressed' else 'image'
    argv = [str(node_executable()), '--ros-args', '-r', f'__node:={options.node_name}']
    if options.namespace.strip('/'):
        argv += ['-r', f'__ns:=/{options.namespace.strip("/")}']
    names = ', '.join(name for _topic, name in cameras)
    argv += ['-p', f'bundle_path:={os.fspath(bundle)}', '-p', f'cameras:=[{names}]',
             '-p', f'input_transport:={transport}',
             '-p', f'use_sim_time:={"true" if sim_time else "false"}']
    if device:
        argv += ['-p', f'device:={device}']
    if precision:
        argv += ['-p', f'precision:={precision}']
    for item in params:
        if ':=' not in item:
            raise ParameterError(f'--node-param {item!r}: write NAME:=VALUE')
        argv += ['-p', item]
    for topic, name in cameras:
        argv += ['-r', f'{name}/{suffix}:={topic}']
    return argv


def start_node(argv: list, env: Optional[dict] = None,
               log_path: Optional[os.PathLike | str] = None) -> NodeProcess:
    """Start the node command line (see :func:`node_argv`) as a real process."""
    return NodeProcess(argv, env, log_path)


def read_bundle_metadata(path: Optional[os.PathLike | str]) -> Optional[dict]:
    """Read a bundle's metadata from its safetensors header (no torch); None if unreadable."""
    if not path:
        return None
    try:
        with open(os.path.expanduser(os.fspath(path)), 'rb') as f:
            (size,) = struct.unpack('<Q', f.read(8))
            if size > 100_000_000:
                return None
            header = json.loads(f.read(size))
        return json.loads(header['__metadata__']['mamba_perception'])
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return None


# --------------------------------------------------------------------------------------------
# What a run records

@dataclass
class SentFrame:
    """One frame published into the node."""

    topic: str
    camera: str
    index: int
    stamp_ns: int  # header stamp in the bag (ground truth pairs with this)
    sent_stamp_ns: int  # header stamp as published (re-stamped in wall-time mode)
    log_time_ns: int
    wall_ns: int  # system clock when published here
    frame_id: str
    height: int = 0
    width: int = 0
    rgb: Optional[np.ndarray] = None  # kept for the report's overlay frames only


@dataclass
class FrameOutputs:
    """The node's outputs for one input frame (the mask PNG-compressed: long runs fit in RAM)."""

    detections: Any = None
    mask_png: Optional[bytes] = None
    mask_shape: Optional[tuple] = None  # (height, width)
    publish_ns: list = field(default_factory=list)  # DDS source timestamps (system clock)
    receive_ns: list = field(default_factory=list)


@dataclass
class LiveRun:
    """Everything :func:`play` observed; :func:`realtime_summary` and :func:`score` read it."""

    bag: dict
    cameras: list  # [(topic, name)]
    transport: str
    sim_time: bool
    rate: float
    clock_source: str
    node: dict
    sent: dict = field(default_factory=dict)  # (camera, sent stamp) -> SentFrame
    outputs: dict = field(default_factory=dict)  # (camera, sent stamp) -> FrameOutputs
    unknown_stamp_outputs: int = 0
    frame_id_mismatches: int = 0
    class_names: list = field(default_factory=list)
    diagnostics: dict = field(default_factory=dict)  # camera -> [(receive ns, {key: value})]
    model_status: dict = field(default_factory=dict)
    clock_history: list = field(default_factory=list)  # (system ns published, clock ns)
    bag_start_ns: int = 0
    wall_start_ns: int = 0
    first_frame_wall_ns: Optional[int] = None
    last_frame_wall_ns: Optional[int] = None
    end_wall_ns: int = 0
    interrupted: bool = False

    def node_clock_ns(self, system_ns: int) -> int:
        """Return the node clock at system time ``system_ns`` (sim: the /clock published here)."""
        if not self.sim_time:
            return system_ns
        hist = self.clock_history
        if not hist:
            return 0
        w0, c0 = hist[0]
        if system_ns >= hist[-1][0]:
            return hist[-1][1] + int((system_ns - hist[-1][0]) * self.rate)
        walls = np.asarray([w - w0 for w, _ in hist], np.float64)
        clocks = np.asarray([c - c0 for _, c in hist], np.float64)
        return c0 + int(np.interp(system_ns - w0, walls, clocks))


# --------------------------------------------------------------------------------------------
# Playing

def _to_ros(msg: Any, msgtype: str, stamp_ns: int) -> Any:
    """Convert a rosbags camera message to an rclpy one with header stamp ``stamp_ns``."""
    from builtin_interfaces.msg import Time
    from sensor_msgs.msg import CompressedImage, Image
    from std_msgs.msg import Header
    header = Header(stamp=Time(sec=stamp_ns // NS, nanosec=stamp_ns % NS),
                    frame_id=str(msg.header.frame_id))
    data = array.array('B', np.ascontiguousarray(msg.data, np.uint8).tobytes())
    if msgtype == COMPRESSED_TYPE:
        out = CompressedImage(header=header, format=str(msg.format))
    else:
        out = Image(header=header, height=int(msg.height), width=int(msg.width),
                    encoding=str(msg.encoding), is_bigendian=int(msg.is_bigendian),
                    step=int(msg.step))
    out.data = data
    return out


def _stamp(msg: Any) -> int:
    return int(msg.header.stamp.sec) * NS + int(msg.header.stamp.nanosec)


def _values(status: Any) -> dict:
    return {kv.key: kv.value for kv in status.values}


def _counters(values: dict) -> dict:
    out = {}
    for key, name in COUNTER_KEYS.items():
        try:
            out[name] = int(values[key])
        except (KeyError, ValueError):
            return {}
    return out


class _Player:
    """The rclpy side of :func:`play`: publishers, recorders, the clock, the spin loop."""

    def __init__(self, run: LiveRun, options: LiveOptions, domain_id: Optional[int],
                 node_proc: Optional[NodeProcess]) -> None:
        import rclpy
        from rclpy.executors import SingleThreadedExecutor
        self.run = run
        self.options = options
        self.node_proc = node_proc
        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=domain_id)
        self.node = rclpy.create_node('mamba_perception_live_replay', context=self.context,
                                      start_parameter_services=False)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.clock_pub = None
        self.last_clock_ns: Optional[int] = None
        self.next_tick = 0.0
        self.generate_clock = False  # True: ticks from the timeline; False: bag /clock only
        self.anchor: Optional[tuple[int, int]] = None  # (system ns, clock ns) of the timeline
        self.pubs: dict = {}
        self.label_info: dict = {}
        self.output_subs: dict = {}
        self.last_output_ns = 0

    def close(self) -> None:
        import rclpy
        try:
            self.executor.shutdown()
            self.node.destroy_node()
        finally:
            rclpy.try_shutdown(context=self.context)

    # -- clock ---------------------------------------------------------------------------------
    def publish_clock(self, clock_ns: int) -> None:
        if self.clock_pub is None:
            return
        from builtin_interfaces.msg import Time
        from rosgraph_msgs.msg import Clock
        if self.last_clock_ns is not None and clock_ns < self.last_clock_ns:
            clock_ns = self.last_clock_ns  # never backwards: the node would reset its windows
        self.clock_pub.publish(Clock(clock=Time(sec=clock_ns // NS, nanosec=clock_ns % NS)))
        self.last_clock_ns = clock_ns
        self.run.clock_history.append((time.time_ns(), clock_ns))

    def tick(self) -> None:
        """Publish the generated /clock when due (sim time only)."""
        if self.clock_pub is None or self.anchor is None:
            return
        now = time.monotonic()
        if now < self.next_tick:
            return
        self.next_tick = now + 1.0 / self.options.clock_hz
        if not self.generate_clock and self.last_clock_ns is not None:
            return
        system, clock = self.anchor
        self.publish_clock(clock + int((time.time_ns() - system) * self.run.rate))

    def spin(self, until: Callable[[], bool], timeout_s: float, what: str = '',
             check_node: bool = True, due: Optional[float] = None) -> bool:
        """Spin (and tick the clock) until ``until()`` or the timeout; False on timeout.

        ``due`` (monotonic s) bounds each wait so that a frame goes out on time.
        """
        deadline = time.monotonic() + timeout_s
        while not until():
            now = time.monotonic()
            if now >= deadline:
                return False
            if check_node and self.node_proc is not None and not self.node_proc.alive():
                raise LiveError(f'the node process exited with code '
                                f'{self.node_proc.proc.returncode} {what}; its log ends with:\n'
                                f'{self.node_proc.output_tail()}')
            self.tick()
            wait = min(0.005, 1.0 / self.options.clock_hz, max(0.0, self.next_tick - now))
            if due is not None:
                wait = min(wait, max(0.0, due - now))
            self.executor.spin_once(timeout_sec=wait)
        return True

    # -- setup ---------------------------------------------------------------------------------
    def setup(self, msgtypes: dict) -> None:
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.qos import (
            DurabilityPolicy,
            HistoryPolicy,
            QoSProfile,
            ReliabilityPolicy,
        )
        from sensor_msgs.msg import CompressedImage, Image
        from vision_msgs.msg import Detection2DArray, LabelInfo
        run, options = self.run, self.options
        reliable = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=100,
                              reliability=ReliabilityPolicy.RELIABLE)
        latched = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1,
                             reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL)
        for topic, camera in run.cameras:
            msg_type = CompressedImage if msgtypes[topic] == COMPRESSED_TYPE else Image
            # reliable publisher: matches best-effort and reliable node inputs (QoS rules)
            self.pubs[topic] = self.node.create_publisher(msg_type, topic, QoSProfile(
                history=HistoryPolicy.KEEP_LAST, depth=10,
                reliability=ReliabilityPolicy.RELIABLE))
            base = _join(options.namespace, camera)
            self.output_subs[camera] = [
                self.node.create_subscription(
                    Detection2DArray, f'{base}/detections',
                    lambda msg, info, c=camera: self.on_output(c, 'detections', msg, info),
                    reliable),
                self.node.create_subscription(
                    Image, f'{base}/segmentation/mask',
                    lambda msg, info, c=camera: self.on_output(c, 'mask', msg, info), reliable)]
            self.node.create_subscription(
                LabelInfo, f'{base}/label_info',
                lambda msg, c=camera: self.label_info.__setitem__(c, msg), latched)
            run.diagnostics[camera] = []
        self.node.create_subscription(DiagnosticArray, '/diagnostics', self.on_diagnostics,
                                      QoSProfile(depth=50,
                                                 reliability=ReliabilityPolicy.RELIABLE))

    def on_output(self, camera: str, kind: str, msg: Any, info: Any) -> None:
        run = self.run
        received = time.time_ns()
        key = (camera, _stamp(msg))
        sent = run.sent.get(key)
        if sent is None:
            run.unknown_stamp_outputs += 1
            return
        if str(msg.header.frame_id) != sent.frame_id:
            run.frame_id_mismatches += 1
        out = run.outputs.setdefault(key, FrameOutputs())
        if kind == 'detections' and out.detections is None:
            out.detections = msg
        elif kind == 'mask' and out.mask_png is None:
            import cv2
            try:
                mask = decode_mask(msg, IMAGE_TYPE, f'{camera} output mask', sent.index)
            except BagError as err:
                log.warning('%s', err)
                return
            out.mask_shape = mask.shape
            out.mask_png = cv2.imencode('.png', mask)[1].tobytes()
        else:
            return  # a duplicate
        source = int(info.get('source_timestamp') or 0) if info else 0
        out.publish_ns.append(source or received)
        out.receive_ns.append(received)
        self.last_output_ns = received

    def on_diagnostics(self, msg: Any) -> None:
        prefix = self.options.node_fqn.lstrip('/')
        received = time.time_ns()
        for status in msg.status:
            if status.name == f'{prefix}: model':
                self.run.model_status = _values(status)
                continue
            for camera in self.run.diagnostics:
                if status.name == f'{prefix}: camera {camera}':
                    self.run.diagnostics[camera].append((received, _values(status)))

    def remote_use_sim_time(self, timeout_s: float) -> Optional[bool]:
        """Ask the running node for ``use_sim_time`` (parameter service); None: no answer."""
        from rcl_interfaces.msg import ParameterType
        from rcl_interfaces.srv import GetParameters
        client = self.node.create_client(GetParameters,
                                         f'{self.options.node_fqn}/get_parameters')
        try:
            if not self.spin(client.service_is_ready, timeout_s, check_node=False):
                return None
            future = client.call_async(GetParameters.Request(names=['use_sim_time']))
            if not self.spin(future.done, timeout_s, check_node=False):
                return None
            values = future.result().values
            if values and values[0].type == ParameterType.PARAMETER_BOOL:
                return bool(values[0].bool_value)
            return None
        finally:
            self.node.destroy_client(client)

    def wait_for_node(self) -> None:
        """Until the node subscribes every camera topic and its outputs are matched here."""
        run = self.run

        def ready() -> bool:
            return all(self.pubs[topic].get_subscription_count() > 0
                       and camera in self.label_info
                       and any(s.get_publisher_count() > 0 for s in self.output_subs[camera])
                       for topic, camera in run.cameras)

        if not self.spin(ready, self.options.wait_for_node_s, 'before it was ready'):
            missing = [f'{topic} (camera {camera}: subscribers '
                       f'{self.pubs[topic].get_subscription_count()}, LabelInfo '
                       f'{"received" if camera in self.label_info else "not received"})'
                       for topic, camera in run.cameras]
            tail = self.node_proc.output_tail() if self.node_proc else ''
            raise LiveError(f'the node {self.options.node_fqn} is not ready after '
                            f'{self.options.wait_for_node_s:g} s: ' + '; '.join(missing)
                            + ('; its log ends with:\n' + tail if tail else
                               '. Is it running in this ROS_DOMAIN_ID, with these cameras '
                               '(--cameras, --node-namespace)?'))
        names: dict = {}
        for camera, msg in self.label_info.items():
            names[camera] = [c.class_name for c in sorted(msg.class_map,
                                                          key=lambda c: c.class_id)]
        first = next(iter(names.values()))
        if any(n != first for n in names.values()):
            raise LiveError(f'cameras report different LabelInfo class lists: {names}')
        run.class_names = list(first)


def play(bag: os.PathLike | str, topics: Sequence[str] = (), exclude: Sequence[str] = (),
         options: Optional[LiveOptions] = None, *, start: Optional[Callable[..., Any]] = None,
         domain_id: Optional[int] = None,
         on_frame: Optional[Callable[[int], None]] = None) -> LiveRun:
    """Play the camera topics of ``bag`` into the node and record what comes back.

    ``start(cameras, transport, sim_time)`` starts the node (returns a :class:`NodeProcess`,
    stopped here at the end); without it the node must be running already. A bag error while
    playing ends the playback and is recorded in ``run.bag`` (``status`` 'partial'); Ctrl-C
    ends it with ``run.interrupted``; both still drain the outputs already on their way.
    """
    options = options or LiveOptions()
    info: dict = {'path': str(bag), 'status': 'running', 'error': None, 'frames': 0}
    node_proc: Optional[NodeProcess] = None
    player: Optional[_Player] = None
    with BagReader(bag) as reader:
        info.update(storage=reader.storage, recovered=reader.recovered, topics=reader.topics)
        cameras, transport = select_cameras(reader, topics, exclude, options)
        info['camera_topics'] = [t for t, _ in cameras]
        has_clock = reader.topics.get('/clock') == CLOCK_TYPE
        counts = reader.message_counts
        total = sum(counts.get(t) or 0 for t, _ in cameras)
        if options.max_frames:
            total = min(total, options.max_frames) if total else options.max_frames
        info['frames_expected'] = total or None
        sim_time = options.sim_time
        try:
            if start is not None:
                sim_time = True if sim_time is None else sim_time
                node_proc = start(cameras, transport, sim_time)
            run = LiveRun(bag=info, cameras=cameras, transport=transport,
                          sim_time=bool(sim_time), rate=options.rate, clock_source='none',
                          node={'name': options.node_fqn, 'started_here': node_proc is not None,
                                'command': node_proc.argv if node_proc else None,
                                'log': str(node_proc.log_path) if node_proc and
                                node_proc.log_path else None})
            player = _Player(run, options, domain_id, node_proc)
            player.setup(reader.topics)
            player.wait_for_node()
            if sim_time is None:  # asked once the node is up: it answers only while spinning
                asked = player.remote_use_sim_time(min(10.0, options.wait_for_node_s))
                if asked is None:
                    log.warning('could not ask %s for use_sim_time; assuming wall time (give '
                                '--sim-time to say otherwise)', options.node_fqn)
                run.sim_time = bool(asked)
                run.node['use_sim_time_asked'] = asked is not None
            run.node['use_sim_time'] = run.sim_time
            if run.sim_time:
                from rclpy.qos import QoSProfile, ReliabilityPolicy
                from rosgraph_msgs.msg import Clock
                player.clock_pub = player.node.create_publisher(
                    Clock, '/clock', QoSProfile(depth=10,
                                                reliability=ReliabilityPolicy.RELIABLE))
                run.clock_source = ('bag /clock topic' if has_clock else
                                    f'generated from the bag log times at '
                                    f'{options.clock_hz:g} Hz')
                clock_pub = player.clock_pub
                if not player.spin(lambda: clock_pub.get_subscription_count() > 0, 5.0,
                                   'before /clock was matched'):
                    log.warning('nobody subscribes /clock: is the node really on sim time?')
            _playback(reader, run, player, options, has_clock, total, on_frame)
        except BaseException:
            if player is not None:
                player.close()
            if node_proc is not None:
                node_proc.stop()
            raise
    try:
        _drain(run, player, options)
    finally:
        player.close()
        if node_proc is not None:
            code = node_proc.stop()
            run.node['exit_code'] = code
    return run


def _playback(reader: BagReader, run: LiveRun, player: _Player, options: LiveOptions,
              has_clock: bool, total: int, on_frame: Optional[Callable[[int], None]]) -> None:
    info = run.bag
    names = dict(run.cameras)
    wanted = [t for t, _ in run.cameras] + (['/clock'] if has_clock and run.sim_time else [])
    every = max(1, (total or 60) // max(1, options.overlays)) if options.overlays else 0
    kept = 0  # frames kept for overlays
    messages = reader.messages(wanted)
    try:
        first = next(messages, None)
    except BagError as err:
        info.update(status='failed', error=str(err))
        return
    if first is None:
        info.update(status='failed', error=f'{reader.path}: no messages on {wanted}')
        return
    run.bag_start_ns = first.log_time_ns
    preroll_ns = int(options.preroll_s * NS)
    # the timeline: bag time bag_start_ns is due at system time wall_start_ns
    run.wall_start_ns = time.time_ns() + preroll_ns
    start_mono = time.monotonic() + options.preroll_s
    if run.sim_time:
        player.generate_clock = True  # pre-roll; the bag's own /clock takes over when it has one
        player.anchor = (run.wall_start_ns, run.bag_start_ns)
    player.spin(lambda: time.monotonic() >= start_mono, options.preroll_s + 1.0, 'during pre-roll')
    player.generate_clock = not has_clock
    sent = 0

    def stream() -> Any:
        yield first
        yield from messages

    try:
        for m in stream():
            if m.topic != '/clock' and options.max_frames and sent >= options.max_frames:
                break
            due = start_mono + (m.log_time_ns - run.bag_start_ns) / NS / options.rate
            if m.topic != '/clock':  # convert first: at the due time only publishing is left
                stamp = header_stamp_ns(m.msg, m.log_time_ns)
                sent_stamp = stamp if run.sim_time else (  # wall time: re-stamp on the timeline
                    run.wall_start_ns + int((stamp - run.bag_start_ns) / options.rate))
                camera = names[m.topic]
                out = _to_ros(m.msg, m.msgtype, sent_stamp)
                frame = SentFrame(m.topic, camera, m.index, stamp, sent_stamp, m.log_time_ns,
                                  0, str(m.msg.header.frame_id))
            player.spin(lambda due=due: time.monotonic() >= due,
                        max(0.0, due - time.monotonic()) + 1.0, 'while playing', due=due)
            if m.topic == '/clock':
                player.publish_clock(int(m.msg.clock.sec) * NS + int(m.msg.clock.nanosec))
                continue
            if run.sim_time and not has_clock:
                player.publish_clock(m.log_time_ns)
            run.sent[(camera, sent_stamp)] = frame  # before publishing: outputs may come fast
            frame.wall_ns = time.time_ns()
            player.pubs[m.topic].publish(out)
            run.first_frame_wall_ns = run.first_frame_wall_ns or frame.wall_ns
            run.last_frame_wall_ns = frame.wall_ns
            sent += 1
            info['frames'] = sent
            keep = bool(every) and m.index % every == 0 and kept < options.overlays
            kept += keep
            if m.msgtype == IMAGE_TYPE and not keep:
                frame.height, frame.width = int(m.msg.height), int(m.msg.width)
            else:  # compressed frames are decoded once for their size
                rgb = decode_image(m.msg, m.msgtype, m.topic, m.index)
                frame.height, frame.width = rgb.shape[:2]
                frame.rgb = rgb if keep else None
            if on_frame is not None:
                on_frame(1)
    except BagError as err:
        info.update(status='partial' if sent else 'failed', error=str(err))
    except KeyboardInterrupt:
        run.interrupted = True
        info['status'] = 'interrupted'


def _drain(run: LiveRun, player: _Player, options: LiveOptions) -> None:
    """Wait for outputs still on their way, then for one more diagnostics report."""
    if run.sim_time and player.last_clock_ns is not None:
        player.anchor = (run.clock_history[-1][0], player.last_clock_ns)
        player.generate_clock = True  # keep the node's time (and its timers) running
    last_frame = run.last_frame_wall_ns or time.time_ns()

    def done() -> bool:
        if len(run.outputs) >= len(run.sent):
            return True
        quiet_since = max(last_frame, player.last_output_ns)
        if time.time_ns() - quiet_since > options.drain_s * NS:
            return True
        return _accounted(run, after_ns=last_frame + NS // 5)

    try:
        player.spin(done, options.drain_s + 600.0, 'while draining')
        # The node counts a frame just after publishing its outputs, so a report can lag the
        # outputs seen here: wait for a later one that accounts for all of them (or give up
        # and keep the last one).
        drained = time.time_ns()
        player.spin(lambda: _accounted(run, drained), max(5.0, 5.0 / options.rate),
                    'waiting for diagnostics')
    except KeyboardInterrupt:
        run.interrupted = True
    run.end_wall_ns = time.time_ns()
    if run.bag['status'] == 'running':
        run.bag['status'] = 'interrupted' if run.interrupted else 'complete'


def _accounted(run: LiveRun, after_ns: int) -> bool:
    """Return True when a node report received after ``after_ns`` accounts for every frame.

    Every frame it received is published, dropped or bad, and it published exactly the
    outputs received here.
    """
    for camera, reports in run.diagnostics.items():
        base, last = _baseline_and_final(run, camera)
        if last is None or reports[-1][0] < after_ns:
            return False
        delta = {k: last[k] - base.get(k, 0) for k in last}
        if delta['frames_received'] != (delta['frames_published'] + delta['frames_dropped']
                                        + delta['bad_inputs']):
            return False
        got = sum(1 for (c, _s) in run.outputs if c == camera)
        if got != delta['frames_published']:
            return False
    return True


def _baseline_and_final(run: LiveRun, camera: str) -> tuple[dict, Optional[dict]]:
    """Node counters before the first frame (zeros for a node started here) and the last ones."""
    reports = [(t, _counters(v)) for t, v in run.diagnostics.get(camera, [])]
    reports = [(t, c) for t, c in reports if c]
    if not reports:
        return {}, None
    first = run.first_frame_wall_ns or 0
    before = [c for t, c in reports if t < first]
    if run.node.get('started_here'):
        base = {k: 0 for k in COUNTER_KEYS.values()}
    else:
        base = before[-1] if before else {}
    return base, reports[-1][1]


# --------------------------------------------------------------------------------------------
# Summaries: the report's realtime section and the accuracy of what came back

def latency_samples(run: LiveRun) -> dict:
    """Per frame with outputs: stamp-to-publish (node clock) and input-to-output (wall) ms."""
    stamp_to_publish, input_to_output = [], []
    for key, frame in run.sent.items():
        out = run.outputs.get(key)
        if out is None or not out.publish_ns:
            continue
        published = max(out.publish_ns)  # the frame's last output: all of it is out
        stamp_to_publish.append((run.node_clock_ns(published) - frame.sent_stamp_ns) / 1e6)
        input_to_output.append((published - frame.wall_ns) / 1e6)
    return {'stamp_to_publish_ms': stamp_to_publish, 'input_to_output_ms': input_to_output}


def _rate_hz(times_ns: Sequence[int]) -> Optional[float]:
    if len(times_ns) < 2:
        return None
    span = (max(times_ns) - min(times_ns)) / NS
    return (len(times_ns) - 1) / span if span > 0 else None


def node_counters(run: LiveRun) -> Optional[dict]:
    """Return what the node's /diagnostics say about this run's frames (per camera, total)."""
    per: dict = {}
    baselines = set()
    for _topic, camera in run.cameras:
        base, last = _baseline_and_final(run, camera)
        if last is None:
            continue
        if run.node.get('started_here'):
            baselines.add('zero (node started here)')
        elif base:
            baselines.add('last report before the first frame')
        else:
            baselines.add('none: counts since the node was configured')
        per[camera] = {k: last[k] - base.get(k, 0) for k in last}
        values = run.diagnostics[camera][-1][1]
        per[camera]['window_latency_ms'] = {'p50': _float(values.get('latency p50 (ms)')),
                                            'p99': _float(values.get('latency p99 (ms)'))}
    if not per:
        return None
    total = {k: sum(c[k] for c in per.values()) for k in COUNTER_KEYS.values()}
    return {'baseline': ', '.join(sorted(baselines)), **total,
            'frames_lost_before_node': len(run.sent) - total['frames_received'],
            'per_camera': per}


def _float(text: Any) -> Optional[float]:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if value == value else None


def realtime_summary(run: LiveRun) -> dict:
    """Build the report's ``realtime`` section: counts first, then latencies and rates."""
    samples = latency_samples(run)
    published = len(run.sent)
    received = len(run.outputs)
    dropped = published - received
    out_times = [max(o.publish_ns) for o in run.outputs.values() if o.publish_ns]
    per_camera = {}
    for topic, camera in run.cameras:
        sent = [k for k in run.sent if k[0] == camera]
        got = sum(1 for k in sent if k in run.outputs)
        per_camera[camera] = {'topic': topic, 'frames_published': len(sent),
                              'outputs_received': got, 'dropped_frames': len(sent) - got}
    span = ((run.last_frame_wall_ns - run.first_frame_wall_ns) / NS
            if run.first_frame_wall_ns else None)
    return {
        'what': ('live mode: the bag\'s camera frames published over DDS into a running '
                 'perception node at their recorded spacing / rate; its outputs recorded'),
        'node': {**run.node, 'cameras': {t: c for t, c in run.cameras},
                 'input_transport': run.transport,
                 'outputs': {c: {'detections': _join(run.node['name'].rsplit('/', 1)[0], c,
                                                     'detections'),
                                 'mask': _join(run.node['name'].rsplit('/', 1)[0], c,
                                               'segmentation/mask')}
                             for _t, c in run.cameras}},
        'clock': {'mode': 'sim time' if run.sim_time else 'wall time', 'rate': run.rate,
                  'clock_published': run.clock_source if run.sim_time else 'none',
                  'stamps': ('recorded header stamps' if run.sim_time else
                             're-stamped onto the replay timeline (system clock)'),
                  'latency_units': ('node clock, sim time: real ms x rate' if run.sim_time
                                    else 'node clock, system time')},
        'frames_published': published,
        'outputs_received': received,
        'dropped_frames': dropped,
        'drop_rate': dropped / published if published else None,
        'outputs_with_unknown_stamp': run.unknown_stamp_outputs,
        'frame_id_mismatches': run.frame_id_mismatches,
        'node_reported': node_counters(run),
        'stamp_to_publish_latency_ms': latency_stats(samples['stamp_to_publish_ms']),
        'input_to_output_latency_ms': latency_stats(samples['input_to_output_ms']),
        'input_rate_hz': _rate_hz([f.wall_ns for f in run.sent.values()]),
        'output_rate_hz': _rate_hz(out_times),
        'playback_s': span,
        'per_camera': per_camera,
        'interrupted': run.interrupted,
    }


@dataclass
class NodeModel:
    """What the node runs, as the replay report needs it (the predictor's attributes)."""

    class_names: list
    class_colors: np.ndarray
    tasks: tuple
    bundle_hash: Optional[str]
    device: str
    precision: Optional[str]
    bundle: Any = None
    random_init: Optional[bool] = None


class _BundleInfo:
    """Name, path and metadata of the node's bundle, read from its file header."""

    def __init__(self, path: Optional[str], metadata: Optional[dict]) -> None:
        self.path = path
        self.metadata = metadata or {}
        meta = self.metadata
        if meta:
            kind = 'RANDOM-INIT ' if meta.get('random_init') else ''
            backbone = (meta.get('config') or {}).get('backbone', {}).get('name', '?')
            self.name = f"{kind}{backbone} {'+'.join(meta.get('tasks', []))} ({path})"
        else:
            self.name = f'{path} (metadata not readable here)' if path else None


def node_model(run: LiveRun, bundle_path: Optional[os.PathLike | str] = None) -> NodeModel:
    """Classes from the node's LabelInfo; hash, device, tasks from its diagnostics."""
    status = run.model_status
    path = os.fspath(bundle_path) if bundle_path else status.get('bundle') or None
    meta = read_bundle_metadata(path)
    n = len(run.class_names)
    colors = None
    if meta:
        colors = np.asarray(meta.get('classes', {}).get('colors_rgb', []), np.uint8)
    if colors is None or colors.shape != (n, 3):
        colors = np.random.default_rng(0).integers(40, 255, (n, 3)).astype(np.uint8)
    tasks = tuple(t for t in status.get('tasks', '').split(',') if t)
    if not tasks and meta:
        tasks = tuple(meta.get('tasks', ()))
    if not tasks:
        seen = {k for o in run.outputs.values() for k in ('detections', 'mask_png')
                if getattr(o, k) is not None}
        tasks = tuple(t for t, k in (('detection', 'detections'), ('segmentation', 'mask_png'))
                      if k in seen)
    return NodeModel(list(run.class_names), colors, tasks,
                     status.get('bundle hash') or (meta or {}).get('content_hash'),
                     status.get('device', 'unknown (node diagnostics not received)'),
                     status.get('precision'), _BundleInfo(path, meta),
                     bool(meta['random_init']) if meta and 'random_init' in meta else None)


def score(run: LiveRun, model: NodeModel, truth: Optional[GroundTruth]) -> Evaluation:
    """Score the outputs that came back against ground truth, with the offline accumulators."""
    evaluation = Evaluation(list(model.class_names), np.asarray(model.class_colors),
                            tuple(model.tasks))
    evaluation.bags.append(run.bag)
    name = Path(run.bag['path']).name
    for key, frame in sorted(run.sent.items(), key=lambda kv: (kv[1].log_time_ns, kv[0])):
        out = run.outputs.get(key)
        if out is None:
            continue
        dets = mask = None
        if out.detections is not None:
            boxes, ids, scores, _unknown = decode_detections(out.detections, model.class_names,
                                                             frame.topic, frame.index)
            dets = Detections(boxes.astype(np.float32), scores.astype(np.float32), ids)
        if out.mask_png is not None:
            import cv2
            mask = cv2.imdecode(np.frombuffer(out.mask_png, np.uint8), cv2.IMREAD_UNCHANGED)
        height, width = (frame.height, frame.width) if frame.height else (
            mask.shape if mask is not None else (0, 0))
        result = FrameResult(int(height), int(width), dets, mask)
        frame_truth = truth.lookup(frame.topic, frame.stamp_ns, frame.index) if truth else \
            FrameTruth()
        caption = f'{name} {frame.topic} #{frame.index}'
        score_frame(evaluation, model, result, frame_truth, caption)
        evaluation.frames += 1
        evaluation.frames_per_topic[frame.topic] = \
            evaluation.frames_per_topic.get(frame.topic, 0) + 1
        if frame.rgb is not None:
            evaluation.overlays.append((caption + ' (live)', overlay_png(
                frame.rgb, result, frame_truth, model.class_colors)))
    if run.wall_start_ns and run.end_wall_ns:
        evaluation.wall_s = (run.end_wall_ns - run.wall_start_ns) / NS
    evaluation.interrupted = run.interrupted
    return evaluation


__all__ = ['LiveError', 'LiveOptions', 'LiveRun', 'NodeModel', 'NodeProcess',
           'camera_name_from_topic', 'latency_samples', 'node_argv', 'node_counters',
           'node_executable', 'node_model', 'play', 'read_bundle_metadata', 'realtime_summary',
           'score', 'select_cameras', 'start_node']
