"""The perception node's parameters as one table: name, default, description, range, validator.

The table is plain data (no rclpy at import time), so config/av.yaml and the launch file are
tested against it. :func:`declare_all` turns it into declared ROS parameters with descriptors;
:func:`validate` is what the node's on-set callback runs, at start (rclpy runs on-set callbacks
for the values given at launch) and on every later change, and returns a reason that names the
parameter, the value and what is allowed.

``dynamic`` parameters take effect at once; the others are read at the next ``configure``.
"""

from dataclasses import dataclass, field
import os
import re
from typing import Any, Callable, Optional

DEVICE_PATTERN = re.compile(r'^(auto|cpu|cuda(:\d+)?)$')
CAMERA_NAME_PATTERN = re.compile(r'^[A-Za-z][A-Za-z0-9_]*$')
PRECISIONS = ('fp32', 'fp16', 'bf16')


@dataclass(frozen=True)
class ParamSpec:
    """One parameter: its default fixes its type; ``low``/``high`` or ``choices`` bound it."""

    name: str
    default: Any
    description: str
    low: Optional[float] = None
    high: Optional[float] = None
    choices: tuple = ()
    dynamic: bool = False
    read_only: bool = False
    check: Optional[Callable[[Any], Optional[str]]] = field(default=None, compare=False)

    @property
    def constraints(self) -> str:
        """Human-readable constraint text for the descriptor and the YAML comments."""
        parts = []
        if self.choices:
            parts.append('one of ' + ', '.join(map(str, self.choices)))
        if self.low is not None:
            parts.append(f'in [{self.low:g}, {self.high:g}]')
        parts.append('changes apply at once' if self.dynamic else 'read at configure')
        return '; '.join(parts)


def _check_cameras(names) -> Optional[str]:
    if not names:
        return 'needs at least one camera name'
    for name in names:
        if not CAMERA_NAME_PATTERN.match(name):
            return (f'camera name {name!r} is not a valid ROS name token '
                    '(letter first, then letters, digits, _)')
    if len(set(names)) != len(names):
        return f'camera names {list(names)} contain duplicates'
    return None


def _check_device(device: str) -> Optional[str]:
    if not DEVICE_PATTERN.match(device):
        return f'unknown device {device!r}; use auto, cpu, cuda or cuda:<index>'
    if device.startswith('cuda'):
        import torch
        if not torch.cuda.is_available():
            return f'device {device!r} requested but CUDA is not available on this machine'
        index = int(device.split(':')[1]) if ':' in device else 0
        if index >= torch.cuda.device_count():
            return (f'device {device!r} does not exist; this machine has '
                    f'{torch.cuda.device_count()} CUDA device(s)')
    return None


def _check_bundle(path: str) -> Optional[str]:
    if path and not os.path.isfile(os.path.expanduser(path)):
        return f'bundle file {path!r} does not exist'
    return None


def _check_warmup(size) -> Optional[str]:
    if len(size) != 2 or min(size) < 0:
        return f'{list(size)} is not [height, width] with non-negative sides ([0, 0] = no warmup)'
    return None


def _check_cache_dir(path: str) -> Optional[str]:
    full = os.path.expanduser(path)
    if path and os.path.exists(full) and not os.path.isdir(full):
        return f'{path!r} exists and is not a directory'
    return None


def _below_one(value: float) -> Optional[str]:
    return None if value < 1.0 else 'must be below 1 (a score of 1 would drop everything)'


PARAMETERS = (
    ParamSpec('cameras', ['camera'],
              'Camera names. Camera <name> is read from <name>/image (raw) or '
              '<name>/image/compressed; its outputs go to <name>/detections, '
              '<name>/segmentation/mask, <name>/label_info, <name>/debug/overlay. '
              'All cameras share one model; frames that are ready together run as one batch.',
              check=_check_cameras),
    ParamSpec('input_transport', 'raw', 'sensor_msgs/Image (raw) or CompressedImage input',
              choices=('raw', 'compressed')),
    ParamSpec('input_reliability', 'best_effort',
              'Input QoS reliability; best_effort (SensorDataQoS) also hears reliable drivers',
              choices=('best_effort', 'reliable')),
    ParamSpec('input_depth', 1, 'Input QoS history depth (the node keeps only the newest frame)',
              low=1, high=100),
    ParamSpec('output_depth', 5, 'QoS depth of the detection and mask publishers (reliable)',
              low=1, high=100),
    ParamSpec('bundle_path', '', 'Model bundle file (.safetensors); required to configure',
              check=_check_bundle),
    ParamSpec('device', 'auto', 'Torch device: auto (cuda if available), cpu, cuda, cuda:<n>',
              check=_check_device),
    ParamSpec('precision', 'fp16', 'Inference precision (fp16/bf16: 16-bit weights + autocast)',
              choices=PRECISIONS),
    ParamSpec('compile', False, 'torch.compile the dense model (slow first frame per size)'),
    ParamSpec('compile_cache_dir', '~/.cache/mamba_perception/torch_compile',
              'Where torch.compile keeps its on-disk caches, so that a restart or reboot loads '
              'the compiled model instead of compiling again; empty: torch\'s default (a temp '
              'directory, lost at reboot)', check=_check_cache_dir),
    ParamSpec('cuda_graphs', True,
              'Capture the dense model in a CUDA graph per input size where the device is CUDA '
              '(without it a batch-1 forward is bound by kernel launches); not applicable on '
              'the CPU, where it is ignored (logged)'),
    ParamSpec('pipelined', True,
              'Two worker threads: the next frames\' dense forward runs on the GPU while this '
              'batch\'s detection, postprocess and publishing run on the host (more frames per '
              'second with several cameras); false: one thread, each batch start to end'),
    ParamSpec('batch_window_ms', 15.0,
              'With several cameras: after a camera\'s frame arrives, wait up to this long for '
              'the other cameras\' frames so they run as one batch (cheaper per frame on a GPU '
              'than several small batches); adds at most this much latency; cameras silent '
              'for diagnostics.silent_after_s are not waited for; 0 takes whatever has arrived',
              low=0.0, high=1000.0, dynamic=True),
    ParamSpec('warmup_size_px', [720, 1280],
              'Frame [height, width] run at configure so the first real frame is fast; '
              '[0, 0] skips warmup', check=_check_warmup),
    ParamSpec('warmup_iterations', 2, 'Warmup runs at configure', low=0, high=20),
    ParamSpec('score_threshold', 0.3, 'Detections with a score at or below are dropped',
              low=0.0, high=1.0, dynamic=True, check=_below_one),
    ParamSpec('nms_iou', 0.5, 'Per-class NMS IoU threshold', low=0.01, high=1.0, dynamic=True),
    ParamSpec('max_detections', 100, 'Boxes kept per frame after NMS', low=1, high=1000,
              dynamic=True),
    ParamSpec('jpeg_decoder', 'auto',
              'CompressedImage JPEG decoding: gpu (torchvision/nvJPEG), cpu (OpenCV), '
              'auto (gpu when the model runs on CUDA)', choices=('auto', 'cpu', 'gpu')),
    ParamSpec('max_input_pixels', 16_777_216,
              'Frames with more pixels (width * height) are rejected as bad input',
              low=1, high=1_073_741_824, dynamic=True),
    ParamSpec('overlay_alpha', 0.5, 'Mask opacity in <name>/debug/overlay (published only '
              'while someone subscribes)', low=0.0, high=1.0, dynamic=True),
    ParamSpec('enabled', True, 'Process frames; false keeps the model loaded but idle',
              dynamic=True),
    ParamSpec('autostart', True, 'Configure and activate at start (false: wait for a '
              'lifecycle manager)', read_only=True),
    ParamSpec('error_log_period_s', 5.0, 'At most one error log per camera and cause per period',
              low=0.0, high=3600.0, dynamic=True),
    ParamSpec('diagnostics.period_s', 1.0, 'Period of /diagnostics messages', low=0.05,
              high=60.0),
    ParamSpec('diagnostics.window_s', 5.0, 'Window of the rates and latency percentiles',
              low=0.5, high=600.0, dynamic=True),
    ParamSpec('diagnostics.expected_rate_hz', 30.0,
              'Expected input rate per camera; WARN when the input or output rate falls below '
              '(1 - rate_tolerance) of it; 0 disables the check', low=0.0, high=1000.0,
              dynamic=True),
    ParamSpec('diagnostics.rate_tolerance', 0.2, 'Allowed fraction below expected_rate_hz',
              low=0.0, high=1.0, dynamic=True),
    ParamSpec('diagnostics.max_latency_ms', 100.0,
              'Stamp-to-publish latency budget: WARN when p99 exceeds it, ERROR when p50 does',
              low=0.1, high=600000.0, dynamic=True),
    ParamSpec('diagnostics.silent_after_s', 2.0,
              'ERROR when a camera has sent no frame for this long (and the batch window '
              'stops waiting for it)', low=0.1, high=3600.0,
              dynamic=True),
)
BY_NAME = {spec.name: spec for spec in PARAMETERS}


def validate(name: str, value: Any) -> Optional[str]:
    """Reason why ``value`` is not acceptable for parameter ``name``; None when it is."""
    spec = BY_NAME.get(name)
    if spec is None:
        return None  # not ours (qos_overrides, use_sim_time, ...): never reject others' names
    problem = None
    if spec.choices and value not in spec.choices:
        problem = f'unknown value {value!r}; allowed: {", ".join(map(str, spec.choices))}'
    elif spec.low is not None and not spec.low <= value <= spec.high:
        problem = f'{value!r} is out of range [{spec.low:g}, {spec.high:g}]'
    elif spec.check is not None:
        problem = spec.check(value)
    return None if problem is None else f'parameter {name!r} rejected: {problem}'


def descriptor(spec: ParamSpec):
    """Return the ``ParameterDescriptor`` of a spec (rclpy enforces its ranges too)."""
    from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
    desc = ParameterDescriptor(description=spec.description,
                               additional_constraints=spec.constraints,
                               read_only=spec.read_only)
    if spec.low is not None:
        if isinstance(spec.default, bool):
            pass
        elif isinstance(spec.default, int):
            desc.integer_range = [IntegerRange(from_value=int(spec.low), to_value=int(spec.high),
                                               step=0)]
        else:
            desc.floating_point_range = [FloatingPointRange(
                from_value=float(spec.low), to_value=float(spec.high), step=0.0)]
    return desc


def declare_all(node) -> None:
    """Declare every parameter of the table on ``node`` (on-set callbacks already added)."""
    node.declare_parameters('', [(spec.name, spec.default, descriptor(spec))
                                 for spec in PARAMETERS])


def values(node) -> dict:
    """Return the current values of all table parameters, by name."""
    return {spec.name: node.get_parameter(spec.name).value for spec in PARAMETERS}
