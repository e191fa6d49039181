r"""The perception node: camera frames in, detections / class masks / LabelInfo / overlay out.

A thin lifecycle layer over :class:`mamba_perception.pipeline.Pipeline`:

* **configure** reads the parameters, loads the bundle, warms the model up and creates the
  publishers (per camera ``<cam>/detections``, ``<cam>/segmentation/mask``,
  ``<cam>/label_info`` (transient local), ``<cam>/debug/overlay``) and the ``/diagnostics`` timer.
* **activate** publishes LabelInfo, starts the inference worker and subscribes
  ``<cam>/image`` (or ``<cam>/image/compressed``).
* **deactivate** unsubscribes and stops the worker; **cleanup** drops the model and frees GPU
  memory. The ``enabled`` parameter pauses processing without unloading.

The subscription callback only stores the message in its camera's one-slot buffer
(:mod:`.latest_frame`); decoding, inference and publishing run in worker threads, so stale
frames are dropped (and counted) and there is never a backlog. With ``pipelined`` (default) the
worker has two stages on two CUDA streams: decode + the dense forward (``Pipeline.submit``),
then detection + postprocess + publishing (``Pipeline.collect``), so the GPU runs the next
batch's forward while the host-bound detection of this one runs. Every output carries the source
image's header. A frame that cannot be processed (bad encoding or size, corrupt JPEG, non-finite
model output, CUDA out of memory) is skipped with a throttled error log and a diagnostics status;
the node goes on with the next frame.

Run::

    ros2 run mamba_perception perception_node --ros-args -p bundle_path:=model.safetensors \\
        -p cameras:="[front, left]" -r front/image:=/sensing/camera/front/image_raw
"""

import contextlib
import functools
import sys
import threading
import time
import traceback
from typing import Any, NamedTuple, Optional

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import SetParametersResult
import rclpy
from rclpy.executors import SingleThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header
from vision_msgs.msg import Detection2DArray, LabelInfo

from mamba_perception.errors import InputError, MambaPerceptionError, NonFiniteOutputError
from mamba_perception.ros import conversions, params, qos
from mamba_perception.ros.diagnostics import OK, Budgets, CameraHealth
from mamba_perception.ros.latest_frame import InferenceWorker, LatestFrames
from mamba_perception.ros.spin import spin_until_shutdown

NODE_NAME = 'mamba_perception'
DYNAMIC_PIPELINE_ATTRIBUTES = {'score_threshold': float, 'nms_iou': float, 'max_detections': int}


def out_of_memory_text(exc: BaseException) -> Optional[str]:
    """Return a one-line report of a CUDA out-of-memory error (cache freed), else None."""
    if 'out of memory' not in str(exc).lower():
        return None
    import torch
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # give the cached blocks back before the next frame
    first_line = str(exc).strip().splitlines()[0][:200]
    return f'CUDA out of memory, frame skipped ({first_line})'


def warmup_batches(num_cameras: int, shape_specialized: bool) -> list[int]:
    """Batch sizes to warm up: every size the worker can form when a size costs a one-off.

    The worker batches the frames that are ready together: 1 to ``num_cameras`` of them. With
    ``compile`` or ``cuda_graphs`` each batch size is a new shape (a compile or a graph
    capture: seconds), so all are warmed at configure, not met live; eager needs only one.
    """
    if shape_specialized:
        return list(range(1, num_cameras + 1))
    return [num_cameras]


def _transition(method):
    """Log an exception escaping a transition (rclpy would swallow it) and return ERROR."""
    @functools.wraps(method)
    def wrapper(self, state):
        try:
            return method(self, state)
        except Exception as exc:
            self.get_logger().error(f'{method.__name__} failed: {type(exc).__name__}: {exc}\n'
                                    f'{traceback.format_exc()}')
            return TransitionCallbackReturn.ERROR
    return wrapper


def _check_model_output_finite(pipeline) -> None:
    """Raise :class:`NonFiniteOutputError` when the dense model outputs NaN/Inf on a neutral frame.

    Broken weights (NaN/Inf everywhere) fail configure here, with every dense output checked;
    a model that goes non-finite only on some frames (fp16 overflow) is caught per frame by the
    Pipeline and those frames are skipped (see ``_process``).
    """
    import torch
    from torch.utils._pytree import tree_leaves
    pad = int(pipeline.input_policy.get('pad_multiple_px', 32))
    x = torch.zeros((1, 3, 2 * pad, 2 * pad), device=pipeline.device)
    # At the pipeline's precision: its fp16 / bf16 weights cannot run an fp32 forward.
    with torch.inference_mode(), pipeline.autocast():
        out = pipeline.model.forward_dense(x)
    for item in tree_leaves(out):
        if isinstance(item, torch.Tensor) and item.is_floating_point():
            if not bool(torch.isfinite(item).all()):
                raise NonFiniteOutputError('the model outputs NaN or Inf on a blank frame: the '
                                           'bundle weights are broken (NaN/Inf weights?)')


class _Batch(NamedTuple):
    """Frames between the worker's two stages (submitted to the pipeline, not yet finished)."""

    pipeline: Any
    cameras: list
    msgs: list
    frames: list  # decoded frames (device tensors on CUDA), for the overlay
    queued_ms: list  # per frame: callback -> taken by the worker
    decode_ms: list
    pending: Any  # PendingFrames
    submitted_at: float  # perf_counter at the end of the first stage


class PerceptionNode(LifecycleNode):
    """Lifecycle node running one shared Pipeline for all configured cameras."""

    def __init__(self, **kwargs) -> None:
        super().__init__(NODE_NAME, **kwargs)
        self.add_on_set_parameters_callback(self._validate_parameters)
        params.declare_all(self)  # values given at start go through the validator above
        self.add_post_set_parameters_callback(self._apply_parameters)
        self._lock = threading.Lock()  # guards self._health (worker, callbacks, timer)
        self._pipeline = None
        self._config: dict = {}
        self._cameras: list = []
        self._health: dict = {}
        self._outputs: dict = {}
        self._staging: dict = {}  # camera -> HostStaging (raw uploads to CUDA; the worker's)
        self._inputs: list = []
        self._frames: Optional[LatestFrames] = None
        self._worker: Optional[InferenceWorker] = None
        self._stage_streams: list = []  # CUDA streams of the worker's two stages (pipelined)
        self._diagnostics_pub = None
        self._diagnostics_timer = None
        self._enabled = bool(self.get_parameter('enabled').value)
        self._last_error_log: dict = {}
        self._jpeg_on_gpu = False
        self._compressed_input = False  # set at activate from input_transport
        self._active = False

    # -- parameters --------------------------------------------------------------------------
    def _validate_parameters(self, changes) -> SetParametersResult:
        for change in changes:
            reason = params.validate(change.name, change.value)
            if reason is not None:
                self.get_logger().error(reason)
                return SetParametersResult(successful=False, reason=reason)
        return SetParametersResult(successful=True)

    def _apply_parameters(self, changes) -> None:
        for change in changes:
            spec = params.BY_NAME.get(change.name)
            if spec is None:
                continue
            if change.name == 'enabled':
                self._enabled = bool(change.value)
                if not self._enabled and self._frames is not None:
                    self._frames.clear()
                self.get_logger().info('processing ' + ('enabled' if self._enabled
                                                        else 'disabled'))
            elif change.name == 'batch_window_ms':
                if self._frames is not None:  # the next take uses it (activate reads it too)
                    self._frames.batch_window_s = float(change.value) / 1e3
            elif change.name == 'diagnostics.silent_after_s':
                if self._frames is not None:  # a silent camera is not waited for either
                    self._frames.silent_after_s = float(change.value)
            elif change.name in DYNAMIC_PIPELINE_ATTRIBUTES and self._pipeline is not None:
                setattr(self._pipeline, change.name,
                        DYNAMIC_PIPELINE_ATTRIBUTES[change.name](change.value))
            elif not spec.dynamic and self._pipeline is not None:
                self.get_logger().info(f'parameter {change.name!r} applies at the next '
                                       'configure (cleanup, configure)')

    def _budgets(self) -> Budgets:
        get = self.get_parameter
        return Budgets(window_s=get('diagnostics.window_s').value,
                       expected_rate_hz=get('diagnostics.expected_rate_hz').value,
                       rate_tolerance=get('diagnostics.rate_tolerance').value,
                       max_latency_ms=get('diagnostics.max_latency_ms').value,
                       silent_after_s=get('diagnostics.silent_after_s').value)

    def _now_ns(self) -> int:
        return self.get_clock().now().nanoseconds

    # -- lifecycle ---------------------------------------------------------------------------
    @_transition
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Load the bundle, warm up, create publishers and the diagnostics timer."""
        log = self.get_logger()
        config = params.values(self)
        if not config['bundle_path']:
            log.error("cannot configure: parameter 'bundle_path' is not set")
            return TransitionCallbackReturn.FAILURE
        import torch

        from mamba_perception.pipeline import Pipeline
        device = config['device']
        if device == 'auto':
            device = 'cuda' if torch.cuda.is_available() else 'cpu'
        log.info(f'configuring: loading {config["bundle_path"]} on {device} '
                 f'({config["precision"]})')
        cuda_graphs = config['cuda_graphs'] and device.startswith('cuda')
        if config['cuda_graphs'] and not cuda_graphs:
            log.info(f'cuda_graphs: not applicable on {device}, running without')
        try:
            pipeline = Pipeline(config['bundle_path'], device=device,
                                precision=config['precision'],
                                score_threshold=config['score_threshold'],
                                nms_iou=config['nms_iou'],
                                max_detections=config['max_detections'],
                                compile=config['compile'], cuda_graphs=cuda_graphs,
                                compile_cache_dir=config['compile_cache_dir'] or None)
            height, width = config['warmup_size_px']
            if config['warmup_iterations'] > 0 and height > 0 and width > 0:
                started = time.perf_counter()
                batches = warmup_batches(len(config['cameras']),
                                         config['compile'] or cuda_graphs)
                pipeline.warmup([(b, height, width) for b in batches],
                                iterations=config['warmup_iterations'])
                log.info(f'warmed up at {height}x{width}, batches {batches}, in '
                         f'{time.perf_counter() - started:.1f} s')
            _check_model_output_finite(pipeline)
        except (MambaPerceptionError, RuntimeError, OSError) as exc:
            log.error(f'cannot configure: {type(exc).__name__}: {exc}')
            return TransitionCallbackReturn.FAILURE
        self._pipeline = pipeline
        self._config = config
        self._cameras = list(config['cameras'])
        decoder = config['jpeg_decoder']
        self._jpeg_on_gpu = (pipeline.device.type == 'cuda' and decoder in ('auto', 'gpu')
                             and conversions.gpu_jpeg_available())
        out_qos = qos.output_qos(config['output_depth'])
        for camera in self._cameras:
            pubs = {'label_info': self.create_lifecycle_publisher(
                LabelInfo, f'{camera}/label_info', qos.LABEL_INFO_QOS)}
            if 'detection' in pipeline.tasks:
                pubs['detections'] = self.create_lifecycle_publisher(
                    Detection2DArray, f'{camera}/detections', out_qos)
            if 'segmentation' in pipeline.tasks:
                pubs['mask'] = self.create_lifecycle_publisher(
                    Image, f'{camera}/segmentation/mask', out_qos)
            pubs['overlay'] = self.create_lifecycle_publisher(
                Image, f'{camera}/debug/overlay', qos.DEBUG_QOS)
            self._outputs[camera] = pubs
        self._staging = {camera: conversions.HostStaging() for camera in self._cameras}
        now = self._now_ns()
        with self._lock:
            self._health = {camera: CameraHealth(camera, now) for camera in self._cameras}
        self._diagnostics_pub = self.create_publisher(DiagnosticArray, '/diagnostics',
                                                      qos.DIAGNOSTICS_QOS)
        self._diagnostics_timer = self.create_timer(config['diagnostics.period_s'],
                                                    self._publish_diagnostics)
        log.info(f'configured: {pipeline!r}, cameras {self._cameras}, '
                 f'{config["input_transport"]} input, JPEG decode on '
                 f'{"GPU" if self._jpeg_on_gpu else "CPU"}')
        return super().on_configure(state)

    @_transition
    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Publish LabelInfo, start the worker, subscribe to the cameras."""
        result = super().on_activate(state)
        header = Header(stamp=self.get_clock().now().to_msg())
        info = conversions.label_info(self._pipeline.class_names,
                                      self._pipeline.score_threshold, header)
        for camera in self._cameras:
            self._outputs[camera]['label_info'].publish(info)
        self._frames = LatestFrames(
            self._cameras, batch_window_s=self.get_parameter('batch_window_ms').value / 1e3,
            silent_after_s=self.get_parameter('diagnostics.silent_after_s').value)
        if self._config['pipelined']:
            self._stage_streams = self._pipeline.stage_streams()
            self._worker = InferenceWorker(self._frames, self._submit, self._worker_crashed,
                                           finish=self._finish)
        else:
            self._stage_streams = []
            self._worker = InferenceWorker(self._frames, self._process, self._worker_crashed)
        self._worker.start()
        now = self._now_ns()
        with self._lock:
            for health in self._health.values():
                health.restart(now)
        compressed = self._compressed_input = self._config['input_transport'] == 'compressed'
        conversions.input_typestore()  # built here, not in the first frame's callback
        in_qos = qos.input_qos(self._config['input_reliability'], self._config['input_depth'])
        for camera in self._cameras:
            topic = f'{camera}/image/compressed' if compressed else f'{camera}/image'
            # raw=True: the callback gets the serialized bytes (see _on_frame)
            self._inputs.append(self.create_subscription(
                CompressedImage if compressed else Image, topic,
                lambda raw, camera=camera: self._on_frame(camera, raw), in_qos, raw=True))
        self._active = True
        self.get_logger().info('active: subscribed to ' + ', '.join(
            s.topic_name for s in self._inputs))
        return result

    def _stop_input(self) -> None:
        self._active = False
        for sub in self._inputs:
            self.destroy_subscription(sub)
        self._inputs = []
        if self._worker is not None:
            if not self._worker.stop():
                self.get_logger().warning('inference worker did not stop within 30 s')
            self._worker = None
        self._frames = None

    @_transition
    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Unsubscribe and stop the worker (the model stays loaded)."""
        self._stop_input()
        self.get_logger().info('deactivated')
        return super().on_deactivate(state)

    def _release(self) -> None:
        for pubs in self._outputs.values():
            for pub in pubs.values():
                self.destroy_lifecycle_publisher(pub)
        self._outputs = {}
        self._staging = {}
        if self._diagnostics_timer is not None:
            self.destroy_timer(self._diagnostics_timer)
            self._diagnostics_timer = None
        if self._diagnostics_pub is not None:
            self.destroy_publisher(self._diagnostics_pub)
            self._diagnostics_pub = None
        on_cuda = self._pipeline is not None and self._pipeline.device.type == 'cuda'
        self._pipeline = None
        if on_cuda:
            import gc

            import torch
            gc.collect()
            torch.cuda.empty_cache()

    @_transition
    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Drop the model (freeing GPU memory), the publishers and the diagnostics timer."""
        self._release()
        self.get_logger().info('cleaned up: model unloaded')
        return super().on_cleanup(state)

    @_transition
    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Stop everything from any state."""
        self._stop_input()
        self._release()
        return super().on_shutdown(state)

    @_transition
    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Release resources after an error in a transition."""
        self._stop_input()
        self._release()
        return TransitionCallbackReturn.SUCCESS

    # -- data path ---------------------------------------------------------------------------
    def _on_frame(self, camera: str, raw: bytes) -> None:
        """Subscription callback: never blocks; keep only the newest frame per camera.

        Frames arrive serialized and are deserialized here with rosbags: the pixels stay in
        ``raw`` (``msg.data`` is a numpy view of it), where rclpy's own message conversion
        would hold the GIL for milliseconds per raw frame on this thread, which also takes
        every other camera's frames (``conversions.deserialize_image``).
        """
        if not self._enabled or not self._active:
            return
        frames = self._frames
        now = self._now_ns()
        try:
            msg = conversions.deserialize_image(raw, self._compressed_input)
        except InputError as exc:
            with self._lock:
                self._health[camera].record_input(now)
            self._bad_frame(camera, 'input', str(exc))
            return
        with self._lock:
            self._health[camera].record_input(now, conversions.stamp_ns(msg.header))
        if frames is not None and frames.put(camera, (msg, time.perf_counter())):
            with self._lock:
                self._health[camera].record_drop(now)

    def _bad_frame(self, camera: str, cause: str, message: str) -> None:
        with self._lock:
            self._health[camera].record_error(self._now_ns(), message)
        key = (camera, cause)
        period = self.get_parameter('error_log_period_s').value
        now = time.monotonic()
        if now - self._last_error_log.get(key, -1e18) >= period:
            self._last_error_log[key] = now
            self.get_logger().error(f'camera {camera}: frame skipped: {message}')

    def _decode(self, camera: str, msg):
        max_pixels = self.get_parameter('max_input_pixels').value
        if self._compressed_input:
            return conversions.compressed_to_rgb(
                msg, max_pixels, decoder='gpu' if self._jpeg_on_gpu else 'cpu',
                device=str(self._pipeline.device))
        if self._pipeline.device.type == 'cuda':
            return conversions.image_to_device_rgb(msg, str(self._pipeline.device), max_pixels,
                                                   self._staging.get(camera))
        return conversions.image_to_rgb(msg, max_pixels)

    def _process(self, taken: dict) -> None:
        """Worker, one stage: start and finish the batch in this thread."""
        batch = self._submit(taken)
        if batch is not None:
            self._finish(batch)

    def _on_stream(self, stage: int):
        """Make this stage's CUDA stream the current one (a no-op when there are none).

        Off CUDA, and when not pipelined, both stages use the default stream.
        """
        if not self._stage_streams:
            return contextlib.nullcontext()
        import torch
        return torch.cuda.stream(self._stage_streams[stage])

    def _submit(self, taken: dict) -> Optional[_Batch]:
        """Worker, first stage: decode the newest frames and queue their dense forward."""
        pipeline = self._pipeline
        if pipeline is None or not self._enabled:
            return None
        cameras, msgs, frames, queued_ms, decode_ms = [], [], [], [], []
        taken_at = time.perf_counter()
        with self._on_stream(0):
            for camera, (msg, received) in taken.items():
                started = time.perf_counter()
                try:
                    frame = self._decode(camera, msg)
                except InputError as exc:
                    self._bad_frame(camera, 'input', str(exc))
                    continue
                except Exception as exc:  # the upload / GPU JPEG decode can run out of memory
                    text = out_of_memory_text(exc)
                    if text is None:
                        raise
                    self._bad_frame(camera, 'out of memory', text)
                    continue
                decode_ms.append((time.perf_counter() - started) * 1e3)
                queued_ms.append((taken_at - received) * 1e3)
                cameras.append(camera)
                msgs.append(msg)
                frames.append(frame)
            if not frames:
                return None
            try:
                pending = pipeline.submit(frames)
            except InputError as exc:
                for camera in cameras:
                    self._bad_frame(camera, 'input', str(exc))
                return None
            except Exception as exc:  # CUDA OOM and other runtime failures: skip, keep serving
                self._failed_batch(cameras, exc)
                return None
        return _Batch(pipeline, cameras, msgs, frames, queued_ms, decode_ms, pending,
                      time.perf_counter())

    def _finish(self, batch: _Batch) -> None:
        """Worker, second stage: detection and postprocess of a submitted batch, then publish."""
        cameras = batch.cameras
        handoff_ms = (time.perf_counter() - batch.submitted_at) * 1e3
        with self._on_stream(1):
            try:
                results = batch.pipeline.collect(batch.pending)
            except NonFiniteOutputError as exc:
                results = self._non_finite_frames(cameras, exc)
            except Exception as exc:  # CUDA OOM and other runtime failures: skip, keep serving
                self._failed_batch(cameras, exc)
                return
            for camera, msg, frame, result, queued, dec in zip(
                    cameras, batch.msgs, batch.frames, results, batch.queued_ms,
                    batch.decode_ms, strict=True):
                if result is None:  # non-finite model output, already reported
                    continue
                try:
                    conversions.check_result(result)
                except InputError as exc:
                    self._bad_frame(camera, 'output', str(exc))
                    continue
                node_ms = {'queued': queued, 'decode': dec, 'handoff': handoff_ms}
                self._publish(camera, conversions.ros_header(msg.header), frame, result, node_ms,
                              len(cameras))

    def _failed_batch(self, cameras: list, exc: BaseException) -> None:
        text = out_of_memory_text(exc) or f'{type(exc).__name__}: {exc}'
        for camera in cameras:
            self._bad_frame(camera, 'inference', text)

    def _non_finite_frames(self, cameras: list, exc: NonFiniteOutputError) -> list:
        """Report each camera whose frame gave NaN/Inf model output; the batch's results.

        The Pipeline fails only the bad frames of a batch: the others' results come with the
        error (``exc.results``, ``None`` at the bad frames) and are published as usual.
        """
        results = list(exc.results) if len(exc.results) == len(cameras) else [None] * len(cameras)
        bad = exc.bad_frames or dict.fromkeys(range(len(cameras)), [])
        for i, outputs in sorted(bad.items()):
            what = ', '.join(outputs) or 'model output'
            self._bad_frame(cameras[i], 'non-finite output',
                            f'non-finite model output: NaN or Inf in {what} (fp16 overflow or '
                            'broken weights?)')
            results[i] = None
        return results

    def _publish(self, camera: str, header, frame, result, node_ms: dict,
                 batch_size: int) -> None:
        """Publish one frame's outputs and record its stage times in its camera's health.

        ``node_ms`` holds the node's own stage times (queued, decode, handoff); the pipeline's
        come with ``result``; ``batch_size``: frames of the batch it ran in.
        """
        started = time.perf_counter()
        pubs = self._outputs.get(camera)
        if pubs is None:
            return
        if 'detections' in pubs and result.detections is not None:
            # serialized here: rclpy's conversion of one Python object per box and field
            # cost ~2.4 ms for 100 boxes (bench/detections_publish.py)
            pubs['detections'].publish(conversions.detections_to_cdr(result, header))
        if 'mask' in pubs and result.class_mask is not None:
            pubs['mask'].publish(conversions.mask_to_cdr(result.class_mask, header))
        overlay_pub = pubs['overlay']
        if overlay_pub.get_subscription_count() > 0:
            pipeline = self._pipeline
            image = conversions.overlay(conversions.rgb_of(frame), result,
                                        pipeline.class_colors, pipeline.class_names,
                                        self.get_parameter('overlay_alpha').value)
            overlay_pub.publish(conversions.image_to_cdr(image, header, 'rgb8'))
            with self._lock:
                self._health[camera].overlays_published += 1
        publish_ms = (time.perf_counter() - started) * 1e3
        stages = result.times.as_dict()
        stage_ms = {**node_ms, 'preprocess': stages['preprocess_ms'],
                    'inference': stages['inference_ms'],
                    'postprocess': stages['postprocess_ms'], 'publish': publish_ms}
        with self._lock:
            self._health[camera].record_output(self._now_ns(), conversions.stamp_ns(header),
                                               stage_ms, batch_size)

    def _worker_crashed(self, exc: BaseException) -> None:
        self.get_logger().error(f'inference worker: unexpected {type(exc).__name__}: {exc}',
                                throttle_duration_sec=5.0)

    # -- diagnostics -------------------------------------------------------------------------
    def _status_prefix(self) -> str:
        """Status names start with the node's namespace and name: 'perception/mamba_perception'."""
        return self.get_fully_qualified_name().lstrip('/')

    def _publish_diagnostics(self) -> None:
        try:
            self._publish_diagnostics_unguarded()
        except Exception as exc:  # a diagnostics bug must not stop the executor
            self.get_logger().error(f'diagnostics: {type(exc).__name__}: {exc}',
                                    throttle_duration_sec=10.0)

    def _publish_diagnostics_unguarded(self) -> None:
        now = self.get_clock().now()
        budgets = self._budgets()
        pipeline = self._pipeline
        hardware = str(pipeline.device) if pipeline is not None else 'none'
        statuses = []
        with self._lock:
            for camera, health in self._health.items():
                level, message, values = health.report(now.nanoseconds, budgets)
                if not self._active:
                    level, message = OK, 'inactive'
                elif not self._enabled:
                    level, message = OK, 'disabled (parameter enabled=false)'
                statuses.append(DiagnosticStatus(
                    level=bytes([level]), name=f'{self._status_prefix()}: camera {camera}',
                    message=message, hardware_id=hardware,
                    values=[KeyValue(key=k, value=v) for k, v in values]))
        if pipeline is not None:
            statuses.append(DiagnosticStatus(
                level=DiagnosticStatus.OK, name=f'{self._status_prefix()}: model',
                message='active' if self._active else 'inactive', hardware_id=hardware,
                values=[KeyValue(key=k, value=str(v)) for k, v in (
                    ('bundle', self._config.get('bundle_path')),
                    ('bundle hash', pipeline.bundle_hash), ('device', pipeline.device),
                    ('precision', pipeline.precision), ('tasks', ','.join(pipeline.tasks)),
                    ('enabled', self._enabled), ('cameras', ','.join(self._cameras)))]))
        self._diagnostics_pub.publish(DiagnosticArray(
            header=Header(stamp=now.to_msg()), status=statuses))


def main(args=None) -> int:
    """Run the node; with ``autostart`` (default) it configures and activates itself."""
    rclpy.init(args=args)
    try:
        node = PerceptionNode()
    except Exception as exc:  # rejected start parameter: say which and exit non-zero
        print(f'[{NODE_NAME}] cannot start: {type(exc).__name__}: {exc}', file=sys.stderr)
        rclpy.try_shutdown()
        return 2
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    outcome = {'code': 0}
    if node.get_parameter('autostart').value:
        # Configure (bundle load, warm-up, torch.compile: seconds to a minute) runs beside the
        # executor, so parameter and lifecycle services (`ros2 param get`, `ros2 lifecycle
        # get`, a lifecycle manager's get_state) answer meanwhile. All node callbacks stay on
        # the one executor thread (a multi-threaded executor took frames off DDS too slowly).
        def fail(reason):
            node.get_logger().fatal(f'{reason}; exiting')
            outcome['code'] = 1
            rclpy.try_shutdown()  # ends spin() below

        def autostart():
            try:
                if node.trigger_configure() != TransitionCallbackReturn.SUCCESS:
                    fail('configure failed (see above)')
                    return
                if node.trigger_activate() != TransitionCallbackReturn.SUCCESS:
                    fail('activate failed (see above)')
            except Exception as exc:  # noqa: BLE001 - never leave a half-started node running
                if rclpy.ok():  # not merely shut down mid-configure
                    fail(f'autostart failed: {type(exc).__name__}: {exc}')

        threading.Thread(target=autostart, name='autostart', daemon=True).start()
    try:
        spin_until_shutdown(executor)
    finally:
        node._stop_input()
        node._release()
        node.destroy_node()
        rclpy.try_shutdown()
    return outcome['code']


if __name__ == '__main__':
    sys.exit(main())
