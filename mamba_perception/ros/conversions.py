"""Pure conversions between ROS messages and the pipeline's arrays; no node, no rclpy.

Inputs (``sensor_msgs/Image``, ``sensor_msgs/CompressedImage``) become uint8 RGB ``(H, W, 3)``
arrays, as zero-copy views over the message buffer where the encoding allows (rgb8, bgr8,
rgba8, bgra8: ``np.frombuffer`` + strides, channel order by a negative stride). Other encodings
(mono8, yuv422 / uyvy / yuyv, bayer_*) are converted with OpenCV, one pass. cv_bridge is not
needed. Every inconsistency raises :class:`~mamba_perception.errors.InputError` naming the field.

Outputs are built from a :class:`~mamba_perception.results.FrameResult` and the source image's
header, which every output copies unchanged (stamp and frame_id): ``vision_msgs/Detection2DArray``
(class ids as numeric strings, boxes as centre/size in source pixels), a mono8 class-id mask at
source resolution, ``vision_msgs/LabelInfo``, and an rgb8 colour overlay for humans.

The decoders read only message fields, so they also run (and are benchmarked) where no ROS
message packages are installed; the builders import the message classes when called.
"""

import array
import struct
from typing import Any, Optional, Sequence

import cv2
import numpy as np

from mamba_perception.errors import InputError
from mamba_perception.results import FrameResult

# encoding -> (bytes per pixel, how to turn the (H, W, channels) view into RGB)
# an index expression (or None) is a zero-copy view; _CV_CODES hold OpenCV cvtColor codes.
_VIEWS = {
    'rgb8': (3, None),
    'bgr8': (3, np.s_[..., ::-1]),
    'rgba8': (4, np.s_[..., :3]),
    'bgra8': (4, np.s_[..., 2::-1]),
}
# OpenCV's Bayer names describe the second row's pattern: ROS 'bayer_rggb8' is cv2 'BayerBG'
# (as cv_bridge maps them).
_CV_CODES = {
    'mono8': (1, cv2.COLOR_GRAY2RGB),
    '8UC1': (1, cv2.COLOR_GRAY2RGB),
    'yuv422': (2, cv2.COLOR_YUV2RGB_UYVY),
    'uyvy': (2, cv2.COLOR_YUV2RGB_UYVY),
    'yuv422_yuy2': (2, cv2.COLOR_YUV2RGB_YUY2),
    'yuyv': (2, cv2.COLOR_YUV2RGB_YUY2),
    'bayer_rggb8': (1, cv2.COLOR_BayerBG2RGB),
    'bayer_bggr8': (1, cv2.COLOR_BayerRG2RGB),
    'bayer_gbrg8': (1, cv2.COLOR_BayerGR2RGB),
    'bayer_grbg8': (1, cv2.COLOR_BayerGB2RGB),
}
Header = Any  # std_msgs/Header; message types are imported where messages are built
SUPPORTED_ENCODINGS = tuple(sorted([*_VIEWS, *_CV_CODES]))
DEFAULT_MAX_PIXELS = 16_777_216  # 16 MP (4096 x 4096)

JPEG_DECODERS = ('auto', 'cpu', 'gpu')


_TYPESTORE: list = []  # the rosbags typestore, built on first use
SERIALIZED_TYPES = {False: 'sensor_msgs/msg/Image', True: 'sensor_msgs/msg/CompressedImage'}


def deserialize_image(raw: bytes, compressed: bool = False) -> Any:
    """Deserialize an ``Image`` (or ``CompressedImage``) from its CDR bytes with rosbags.

    The node subscribes to camera topics in serialized form: rclpy's own conversion of a
    1280x720 bgr8 Image into Python objects copies the pixels twice into fresh memory and holds
    the GIL for ~1.2 ms (development CPU; several ms per frame on the GPU host, where it was
    the largest single user of the GIL with 4 cameras), while rosbags' deserializer returns
    ``data`` as a numpy view of ``raw`` (tens of µs). The result has the ROS field names
    (``header.stamp.sec``, ``encoding``, ``step``, ``data``...), so every decoder here takes it.

    Raises:
        InputError: ``raw`` is not a complete message of that type (truncated, corrupt).
    """
    typename = SERIALIZED_TYPES[bool(compressed)]
    store = input_typestore()
    try:
        # a memoryview: rosbags slices off the CDR header, which would copy a bytes object
        return store.deserialize_cdr(memoryview(raw), typename)
    except Exception as exc:  # rosbags raises struct / numpy / unicode errors on bad bytes
        raise InputError(f'corrupt serialized {typename} ({len(raw)} bytes): '
                         f'{type(exc).__name__}: {exc}') from exc


def input_typestore() -> Any:
    """Return the rosbags typestore of :func:`deserialize_image` (built once: ~50 ms)."""
    if not _TYPESTORE:
        from mamba_perception.replay.bag import make_typestore
        _TYPESTORE.append(make_typestore())
    return _TYPESTORE[0]


def ros_header(header: Any):
    """Return a ``std_msgs/Header`` (rclpy) with the stamp and frame_id of ``header``."""
    from builtin_interfaces.msg import Time
    from std_msgs.msg import Header as RosHeader
    return RosHeader(stamp=Time(sec=int(header.stamp.sec), nanosec=int(header.stamp.nanosec)),
                     frame_id=str(header.frame_id))


def stamp_ns(header: Header) -> int:
    """Integer nanoseconds of a header's stamp."""
    return int(header.stamp.sec) * 1_000_000_000 + int(header.stamp.nanosec)


def _check_size(width: int, height: int, max_pixels: int, what: str) -> None:
    if width <= 0 or height <= 0:
        raise InputError(f'{what}: empty image ({width}x{height} pixels)')
    if width * height > max_pixels:
        raise InputError(f'{what}: {width}x{height} = {width * height} pixels exceeds the limit '
                         f'max_input_pixels={max_pixels}')


def image_to_rgb(msg, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Return a uint8 RGB ``(H, W, 3)`` array for a ``sensor_msgs/Image``.

    rgb8 / bgr8 / rgba8 / bgra8 give a zero-copy (possibly non-contiguous, read-only) view of
    ``msg.data``; other supported encodings are converted with OpenCV.

    :raises InputError: unknown encoding, 0x0 or too many pixels, ``step`` smaller than a row,
        or ``data`` length not equal to ``step * height``.
    """
    encoding = msg.encoding.strip()
    width, height, step = int(msg.width), int(msg.height), int(msg.step)
    what = f'Image {width}x{height} {encoding!r}'
    if encoding in _VIEWS:
        channels, index = _VIEWS[encoding]
    elif encoding.lower() in _CV_CODES:
        channels, code = _CV_CODES[encoding.lower()]
        index = None
    else:
        raise InputError(f'{what}: unsupported encoding {encoding!r}; supported: '
                         f'{", ".join(SUPPORTED_ENCODINGS)}')
    _check_size(width, height, max_pixels, what)
    if step < width * channels:
        raise InputError(f'{what}: step {step} is smaller than width * {channels} bytes = '
                         f'{width * channels}')
    size = len(msg.data)
    if size != step * height:
        raise InputError(f'{what}: data holds {size} bytes, expected step * height = '
                         f'{step} * {height} = {step * height}')
    flat = np.frombuffer(msg.data, np.uint8)
    view = np.lib.stride_tricks.as_strided(flat, (height, width, channels), (step, channels, 1),
                                           writeable=False)
    if encoding in _VIEWS:
        return view if index is None else view[index]
    source = view[..., 0] if channels == 1 else view
    if not source.flags.c_contiguous:
        source = np.ascontiguousarray(source)
    return cv2.cvtColor(source, code)


class HostStaging:
    """A reused page-locked host buffer that one camera's frames are uploaded through.

    From pageable memory (a message's ``data``) ``.to('cuda')`` is a synchronous copy that the
    driver stages in pieces (~0.3 ms for a 1280x720 bgr8 frame on the H100 host); from
    page-locked memory it is one asynchronous DMA queued behind nothing, and refilling a reused
    buffer faults in no new pages. The buffer is refilled only once the copy out of it has
    finished (an event recorded behind it), so one staging per camera is safe. On a non-CUDA
    device the same filling runs into ordinary memory and the result is a copy (tested on CPU).
    """

    def __init__(self) -> None:
        self._host = None  # flat uint8 tensor, page-locked for CUDA
        self._pinned = False
        # torch.cuda.Event re-recorded behind each copy out of _host (waiting on one never
        # recorded returns at once). A replaced buffer needs no wait: torch's page-locked
        # allocator keeps it until the copies that read it are done.
        self._copied = None

    def upload(self, pixels: np.ndarray, device) -> Any:
        """``pixels`` (uint8, any strides) as a contiguous tensor on ``device``."""
        import torch
        device = torch.device(device)
        cuda = device.type == 'cuda'
        if self._host is None or self._host.numel() < pixels.size or self._pinned != cuda:
            self._host = torch.empty(pixels.size, dtype=torch.uint8, pin_memory=cuda)
            self._pinned = cuda
            self._copied = torch.cuda.Event() if cuda else None
        if self._copied is not None:
            self._copied.synchronize()
        host = self._host[:pixels.size].view(pixels.shape)
        np.copyto(host.numpy(), pixels, casting='no')
        if not cuda:
            return host.to(device, copy=True)
        with torch.cuda.device(device):
            out = host.to(device, non_blocking=True)
            self._copied.record()
        return out


def image_to_device_rgb(msg, device: str, max_pixels: int = DEFAULT_MAX_PIXELS,
                        staging: Optional[HostStaging] = None):
    """Return the frame as a uint8 RGB ``(H, W, 3)`` torch tensor on ``device``.

    For rgb8 / bgr8 / rgba8 / bgra8 the message bytes are uploaded as they are (one copy, through
    ``staging`` when given) and the channel order is fixed on the device: a CPU-side BGR->RGB
    copy of a 1280x720 frame costs ~6 ms, the upload ~0.3 ms. The result may be a strided view
    (alpha dropped). Other encodings are converted on the CPU first.
    """
    from mamba_perception.pipeline import frame_tensor
    rgb = image_to_rgb(msg, max_pixels)  # validates; a strided view for the view encodings
    encoding = msg.encoding.strip()
    if encoding not in _VIEWS:
        return (staging.upload(rgb, device) if staging is not None
                else frame_tensor(rgb).to(device))
    channels = _VIEWS[encoding][0]
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    flat = np.frombuffer(msg.data, np.uint8)
    rows = flat.reshape(height, step)[:, :width * channels]  # a view; contiguous if no padding
    if staging is not None:
        pixels = staging.upload(rows, device)
    else:
        pixels = frame_tensor(np.ascontiguousarray(rows)).to(device)
    pixels = pixels.view(height, width, channels)[..., :3]
    # flip() is one kernel; indexing with a channel list would also upload the index
    return pixels.flip(-1) if encoding.startswith('bgr') else pixels


def compressed_format(msg) -> str:
    """'jpeg' or 'png' from the ``format`` field (``"bgr8; jpeg compressed bgr8"``, ``"png"``)."""
    fmt = msg.format.lower()
    if 'png' in fmt:
        return 'png'
    return 'jpeg'  # compressed_image_transport: empty or unparsable means JPEG


def compressed_size(data: np.ndarray) -> Optional[tuple]:
    """``(width, height)`` read from a JPEG (SOF marker) or PNG (IHDR) header; None if absent."""
    buf = data.tobytes()[:65536] if data.size > 65536 else data.tobytes()
    if buf[:8] == b'\x89PNG\r\n\x1a\n' and len(buf) >= 24:
        return int.from_bytes(buf[16:20], 'big'), int.from_bytes(buf[20:24], 'big')
    if buf[:2] != b'\xff\xd8':
        return None
    i = 2
    while i + 9 < len(buf):
        if buf[i] != 0xFF:
            return None
        marker = buf[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        length = int.from_bytes(buf[i + 2:i + 4], 'big')
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return int.from_bytes(buf[i + 7:i + 9], 'big'), int.from_bytes(buf[i + 5:i + 7], 'big')
        i += 2 + length
    return None


def compressed_to_rgb(msg, max_pixels: int = DEFAULT_MAX_PIXELS,
                      decoder: str = 'cpu', device: str = 'cuda'):
    """Decode a ``sensor_msgs/CompressedImage`` (JPEG or PNG) to uint8 RGB ``(H, W, 3)``.

    ``decoder='gpu'`` decodes JPEG with ``torchvision.io.decode_jpeg`` on ``device`` and returns
    a torch tensor there (the pipeline accepts it as is); PNG always decodes on the CPU.

    :raises InputError: empty data, unreadable header, too many pixels, truncated JPEG (no
        end-of-image marker), or data that OpenCV / nvJPEG cannot decode.
    """
    data = np.frombuffer(msg.data, np.uint8)
    fmt = compressed_format(msg)
    what = f'CompressedImage {msg.format!r} ({data.size} bytes)'
    if data.size == 0:
        raise InputError(f'{what}: no data')
    size = compressed_size(data)
    if size is None:
        raise InputError(f'{what}: not a JPEG or PNG stream (no readable image header)')
    _check_size(size[0], size[1], max_pixels, what)
    if fmt == 'jpeg' or data[:2].tobytes() == b'\xff\xd8':
        if b'\xff\xd9' not in data[-16:].tobytes():
            raise InputError(f'{what}: truncated JPEG (no end-of-image marker)')
        if decoder == 'gpu':
            return _decode_jpeg_gpu(data, device, what)
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if bgr is None:
        raise InputError(f'{what}: OpenCV cannot decode it (corrupt {fmt})')
    if bgr.shape[1] != size[0] or bgr.shape[0] != size[1]:
        raise InputError(f'{what}: decoded {bgr.shape[1]}x{bgr.shape[0]}, header said '
                         f'{size[0]}x{size[1]}')
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _decode_jpeg_gpu(data: np.ndarray, device: str, what: str):
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg
    try:
        chw = decode_jpeg(torch.from_numpy(data.copy()), mode=ImageReadMode.RGB, device=device)
    except RuntimeError as exc:
        raise InputError(f'{what}: nvJPEG cannot decode it ({exc})') from None
    return chw.permute(1, 2, 0)


def gpu_jpeg_available() -> bool:
    """Return True when torchvision can decode JPEG on a CUDA device here."""
    try:
        import torch
        import torchvision.io  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def _fill_bytes(target_msg, array_like: np.ndarray) -> None:
    """Set ``target_msg.data`` from a uint8 array with one copy (not a per-byte Python check)."""
    buf = array.array('B')
    buf.frombytes(np.ascontiguousarray(array_like, np.uint8).data)
    target_msg.data = buf


def check_result(result: FrameResult) -> None:
    """Raise :class:`InputError` when the model output is unusable (non-finite, out of range)."""
    dets = result.detections
    if dets is not None and len(dets):
        if not np.isfinite(dets.boxes_xyxy_px).all() or not np.isfinite(dets.scores).all():
            raise InputError('model output contains NaN or Inf (boxes or scores); frame skipped')
    mask = result.class_mask
    if mask is not None and mask.shape != (result.height_px, result.width_px):
        raise InputError(f'model mask shape {mask.shape} differs from the image '
                         f'{result.height_px}x{result.width_px}')


def detections_to_msg(result: FrameResult, header: Header):
    """``Detection2DArray`` with the source header; boxes as centre/size in source pixels."""
    from vision_msgs.msg import Detection2D, Detection2DArray, ObjectHypothesisWithPose
    out = Detection2DArray(header=header)
    dets = result.detections
    if dets is None or not len(dets):
        return out
    boxes = dets.boxes_xyxy_px.astype(np.float64)
    centres = (boxes[:, :2] + boxes[:, 2:]) * 0.5
    sizes = boxes[:, 2:] - boxes[:, :2]
    items = []
    for (cx, cy), (w, h), score, cls in zip(centres.tolist(), sizes.tolist(),
                                            dets.scores.tolist(), dets.class_ids.tolist(),
                                            strict=True):
        det = Detection2D(header=header)
        det.bbox.center.position.x = cx
        det.bbox.center.position.y = cy
        det.bbox.size_x = w
        det.bbox.size_y = h
        hyp = ObjectHypothesisWithPose()
        hyp.hypothesis.class_id = str(int(cls))
        hyp.hypothesis.score = float(score)
        det.results = [hyp]
        items.append(det)
    out.detections = items
    return out


# CDR (little endian) of the parts of a Detection2D after its class id: the score, the
# hypothesis pose (position 0, orientation the identity quaternion, covariance 0), the box
# (centre x, y, theta 0, size_x, size_y): 49 float64 in a row, 8-aligned.
_DET_DOUBLES = 49
_DET_SCORE, _DET_QUAT_W, _DET_BOX = 0, 7, 44


def _cdr_string(text: bytes, offset: int) -> tuple:
    """CDR of a string at ``offset`` (4-aligned): uint32 length incl. NUL, bytes, NUL."""
    return struct.pack('<I', len(text) + 1) + text + b'\0', offset + 5 + len(text)


def _pad(offset: int, align: int) -> bytes:
    return b'\0' * (-offset % align)


def _header_cdr(header: Header) -> bytes:
    """CDR of a std_msgs/Header at a 4-aligned offset (stamp, frame_id), padded to 4 bytes."""
    stamp = header.stamp
    frame, end = _cdr_string(str(header.frame_id).encode(), 8)
    return struct.pack('<iI', int(stamp.sec), int(stamp.nanosec)) + frame + _pad(end, 4)


def detections_to_cdr(result: FrameResult, header: Header) -> bytes:
    """Return :func:`detections_to_msg`'s ``Detection2DArray`` as serialized CDR bytes.

    No Python message per box is built: rclpy's conversion of a Detection2DArray (nested
    Python objects, ~10 per box) costs ~2.4 ms for 100 boxes on the development CPU, on the
    node's worker thread and under the GIL; this costs a fraction
    (bench/detections_publish.py). ``Publisher.publish`` takes the bytes as a
    serialized message. Same length as rclpy's serialization and deserializes to the same
    message (CDR leaves padding bytes unspecified: zeros here); test_conversions.py checks it.
    """
    header_cdr = _header_cdr(header)  # the array's and every box's: the same bytes
    dets = result.detections
    n = 0 if dets is None else len(dets)
    parts = [b'\0\1\0\0', header_cdr, struct.pack('<I', n)]
    offset = len(header_cdr) + 4
    if n:
        boxes = dets.boxes_xyxy_px.astype(np.float64)
        doubles = np.zeros((n, _DET_DOUBLES), np.float64)
        doubles[:, _DET_SCORE] = dets.scores
        doubles[:, _DET_QUAT_W] = 1.0
        doubles[:, _DET_BOX:_DET_BOX + 2] = (boxes[:, :2] + boxes[:, 2:]) * 0.5
        doubles[:, _DET_BOX + 3:_DET_BOX + 5] = boxes[:, 2:] - boxes[:, :2]
        rows = [row.tobytes() for row in doubles]
        empty_id = struct.pack('<I', 1) + b'\0'
        # Each Detection2D starts 4-aligned: header, results (one hypothesis), box, id.
        det_head = header_cdr + struct.pack('<I', 1)
        for row, cls in zip(rows, dets.class_ids.tolist(), strict=True):
            align = _pad(offset, 4)  # after the previous box's id (no padding at the end)
            offset += len(align)
            class_id, end = _cdr_string(str(int(cls)).encode(), offset + len(det_head))
            pad = _pad(end, 8)
            parts += [align, det_head, class_id, pad, row, empty_id]
            offset = end + len(pad) + 8 * _DET_DOUBLES + 5
    return b''.join(parts)


def array_to_image(pixels: np.ndarray, header: Header, encoding: str):
    """``sensor_msgs/Image`` over a uint8 ``(H, W)`` or ``(H, W, C)`` array (one copy)."""
    from sensor_msgs.msg import Image
    height, width = pixels.shape[:2]
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    msg = Image(header=header, height=height, width=width, encoding=encoding, is_bigendian=0,
                step=width * channels)
    _fill_bytes(msg, pixels)
    return msg


def image_to_cdr(pixels: np.ndarray, header: Header, encoding: str) -> bytes:
    """Return :func:`array_to_image`'s ``sensor_msgs/Image`` as serialized CDR bytes.

    The pixels are copied once, into the bytes (``array_to_image`` copies them into the
    message's array, rclpy again into its C message, the middleware again to serialize it),
    and no Python message is built; ``Publisher.publish`` takes the bytes. Same length as
    rclpy's serialization and deserializes to the same message (test_conversions.py).
    """
    pixels = np.ascontiguousarray(pixels, np.uint8)
    height, width = pixels.shape[:2]
    step = width * (1 if pixels.ndim == 2 else pixels.shape[2])
    header_cdr = _header_cdr(header)
    enc, end = _cdr_string(encoding.encode(), len(header_cdr) + 8)  # after height, width
    end += 1  # is_bigendian
    return b''.join([b'\0\1\0\0', header_cdr, struct.pack('<II', height, width), enc, b'\0',
                     _pad(end, 4), struct.pack('<II', step, pixels.nbytes), pixels.data])


def mask_to_cdr(mask: np.ndarray, header: Header) -> bytes:
    """mono8 class-id ``Image`` at source resolution with the source header, as CDR bytes."""
    if mask.dtype != np.uint8 or mask.ndim != 2:
        raise InputError(f'class mask must be (H, W) uint8, got {mask.shape} {mask.dtype}')
    return image_to_cdr(mask, header, 'mono8')


def label_info(class_names: Sequence[str], threshold: float, header: Header):
    """``LabelInfo``: class id i (as used in detections and the mask) is ``class_names[i]``."""
    from vision_msgs.msg import LabelInfo, VisionClass
    return LabelInfo(header=header, threshold=float(threshold),
                     class_map=[VisionClass(class_id=i, class_name=str(name))
                                for i, name in enumerate(class_names)])


def overlay(rgb: np.ndarray, result: FrameResult, colors: np.ndarray,
            class_names: Sequence[str], alpha: float = 0.5) -> np.ndarray:
    """Return RGB with the class mask blended in (``alpha``) and boxes drawn (class, score)."""
    out = np.ascontiguousarray(rgb, np.uint8).copy()
    colors = np.asarray(colors, np.uint8)
    if result.class_mask is not None and alpha > 0:
        tinted = colors[np.minimum(result.class_mask, len(colors) - 1)]
        cv2.addWeighted(tinted, alpha, out, 1.0 - alpha, 0.0, dst=out)
    dets = result.detections
    if dets is not None:
        thickness = max(1, round(min(out.shape[:2]) / 300))
        for box, score, cls in zip(dets.boxes_xyxy_px.tolist(), dets.scores.tolist(),
                                   dets.class_ids.tolist(), strict=True):
            color = tuple(int(c) for c in colors[int(cls) % len(colors)])
            x1, y1, x2, y2 = (int(round(v)) for v in box)
            cv2.rectangle(out, (x1, y1), (x2, y2), color, thickness)
            name = class_names[cls] if 0 <= cls < len(class_names) else str(cls)
            cv2.putText(out, f'{name} {score:.2f}', (x1, max(y1 - 3, 10)),
                        cv2.FONT_HERSHEY_SIMPLEX, 0.4 * thickness, color, thickness)
    return out


def rgb_of(frame) -> np.ndarray:
    """Host uint8 RGB array of a decoded frame (numpy already, or a torch tensor on any device)."""
    if isinstance(frame, np.ndarray):
        return frame
    return frame.cpu().numpy()
