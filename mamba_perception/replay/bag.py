"""Read camera frames and ground truth from rosbags without ROS (``rosbags`` + numpy + OpenCV).

Storages: rosbag2 directories (sqlite3 or MCAP), bare ``.mcap`` files and ROS 1 ``.bag`` files.
An MCAP file that cannot be opened normally (a recorder that died leaves no summary; a copy that
was cut short) is read record by record up to the damage, so every complete message before it
is still used; the error then names the topic and message index where reading stopped.

Timestamps are int nanoseconds: ``stamp_ns`` is the message's ``header.stamp``, ``log_time_ns``
the time the recorder stored it. Ground truth is paired with frames by ``stamp_ns``.

Every problem is a :class:`~mamba_perception.errors.BagError` whose message names the bag and,
where there is one, the topic and the message index (0-based, counted per topic).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
import hashlib
import os
from pathlib import Path
import struct
from typing import Any, Optional

import numpy as np

from mamba_perception.errors import BagError

IMAGE_TYPE = 'sensor_msgs/msg/Image'
COMPRESSED_TYPE = 'sensor_msgs/msg/CompressedImage'
DETECTIONS_TYPE = 'vision_msgs/msg/Detection2DArray'
CAMERA_TYPES = (IMAGE_TYPE, COMPRESSED_TYPE)

# vision_msgs definitions (the same as interfaces/vision_msgs_compat/msg/*.msg, which
# test/replay/test_bag.py checks), so that bags with these types are read and written
# without a ROS installation: rosbags' typestores do not know vision_msgs.
VISION_MSGS = {
    'vision_msgs/msg/Point2D': 'float64 x\nfloat64 y\n',
    'vision_msgs/msg/Pose2D': 'vision_msgs/Point2D position\nfloat64 theta\n',
    'vision_msgs/msg/BoundingBox2D': 'vision_msgs/Pose2D center\nfloat64 size_x\nfloat64 size_y\n',
    'vision_msgs/msg/ObjectHypothesis': 'string class_id\nfloat64 score\n',
    'vision_msgs/msg/ObjectHypothesisWithPose': (
        'ObjectHypothesis hypothesis\ngeometry_msgs/PoseWithCovariance pose\n'),
    'vision_msgs/msg/Detection2D': (
        'std_msgs/Header header\nObjectHypothesisWithPose[] results\nBoundingBox2D bbox\n'
        'string id\n'),
    'vision_msgs/msg/Detection2DArray': 'std_msgs/Header header\nDetection2D[] detections\n',
    'vision_msgs/msg/VisionClass': 'uint16 class_id\nstring class_name\n',
    'vision_msgs/msg/LabelInfo': (
        'std_msgs/Header header\nvision_msgs/VisionClass[] class_map\nfloat32 threshold\n'),
}

# Raw image encodings the reader converts to RGB (the pipeline takes uint8 RGB only).
_RGB_CHANNELS = {'rgb8': 3, 'bgr8': 3, 'rgba8': 4, 'bgra8': 4, '8UC3': 3, '8UC4': 4}
_MONO8 = ('mono8', '8UC1')
_MONO16 = ('mono16', '16UC1')
_BAYER = {'bayer_rggb8': 'RG', 'bayer_bggr8': 'BG', 'bayer_gbrg8': 'GB', 'bayer_grbg8': 'GR'}
_YUV = {'yuv422': 'UYVY', 'uyvy': 'UYVY', 'yuv422_yuy2': 'YUY2', 'yuyv': 'YUY2'}
SUPPORTED_ENCODINGS = tuple(sorted([*_RGB_CHANNELS, *_MONO8, *_MONO16, *_BAYER, *_YUV]))


def make_typestore(ros1: bool = False) -> Any:
    """Return a rosbags typestore (ROS 2 Humble, or ROS 1 Noetic) with vision_msgs registered."""
    from rosbags.typesys import Stores, get_types_from_msg, get_typestore
    store = get_typestore(Stores.ROS1_NOETIC if ros1 else Stores.ROS2_HUMBLE)
    types: dict = {}
    for name, text in VISION_MSGS.items():
        types.update(get_types_from_msg(text, name))
    store.register(types)
    return store


def stamp_to_ns(stamp: Any) -> int:
    """``builtin_interfaces/Time`` (sec, nanosec) -> int ns."""
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def header_stamp_ns(msg: Any, fallback_ns: int) -> int:
    """Return the header stamp in ns, or ``fallback_ns`` when it has none (or zero)."""
    header = getattr(msg, 'header', None)
    if header is None:
        return fallback_ns
    ns = stamp_to_ns(header.stamp)
    return ns if ns else fallback_ns


# --------------------------------------------------------------------------------------------
# Provenance

def bag_files(path: os.PathLike | str) -> list[Path]:
    """Files that make up a bag: a directory's files (sorted) or the file itself."""
    p = Path(path)
    if p.is_dir():
        return sorted(f for f in p.iterdir() if f.is_file())
    return [p]


def bag_hash(path: os.PathLike | str) -> dict:
    """``{'sha256': ..., 'size_bytes': ...}`` over the bag's files (names and contents)."""
    digest = hashlib.sha256()
    size = 0
    for f in bag_files(path):
        digest.update(f.name.encode() + b'\0')
        with open(f, 'rb') as fh:
            for block in iter(lambda fh=fh: fh.read(1 << 20), b''):
                digest.update(block)
                size += len(block)
    return {'sha256': 'sha256:' + digest.hexdigest(), 'size_bytes': size}


def find_bags(paths: Iterable[os.PathLike | str]) -> list[Path]:
    """Expand a list of bags and folders of bags into bag paths (sorted within a folder).

    A folder holding ``metadata.yaml`` is one rosbag2; any other folder is searched one level
    deep for rosbag2 folders, ``.mcap`` and ``.bag`` files.
    """
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise BagError(f'{p}: no such bag (file or folder)')
        if p.is_file() or (p / 'metadata.yaml').exists():
            out.append(p)
            continue
        found = sorted(c for c in p.iterdir()
                       if (c.is_dir() and (c / 'metadata.yaml').exists())
                       or (c.is_file() and c.suffix in ('.mcap', '.bag')))
        if not found:
            raise BagError(f'{p}: folder holds no bags (rosbag2 folders with metadata.yaml, '
                           '.mcap or .bag files)')
        out.extend(found)
    return out


# --------------------------------------------------------------------------------------------
# Reading

@dataclass
class BagMessage:
    """One decoded message. ``index`` counts the messages of ``topic`` from 0."""

    topic: str
    msgtype: str
    index: int
    log_time_ns: int
    msg: Any


@dataclass
class _Conn:
    topic: str
    msgtype: str
    msgdef: str = ''
    count: Optional[int] = None
    handles: list = field(default_factory=list)


class BagReader:
    """Open a bag, list its topics and iterate decoded messages of selected topics.

    Use as a context manager. ``recovered`` is True when the bag could not be opened normally
    and is being read record by record (MCAP only); ``open_error`` then says why.
    """

    def __init__(self, path: os.PathLike | str) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise BagError(f'{self.path}: no such bag (file or folder)')
        self.ros1 = self.path.suffix == '.bag'
        self.typestore = make_typestore(ros1=self.ros1)
        self._reader: Any = None
        self._conns: dict[str, _Conn] = {}
        self.recovered = False
        self.open_error: Optional[str] = None
        self.storage = 'unknown'

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> BagReader:
        self.open()
        return self

    def __exit__(self, *exc: object) -> bool:
        self.close()
        return False

    def open(self) -> None:
        """Open the bag and collect its topics; falls back to MCAP recovery where possible."""
        try:
            if self.ros1:
                from rosbags.rosbag1 import Reader as Reader1
                self._reader = Reader1(self.path)
            else:
                from rosbags.rosbag2 import Reader as Reader2
                self._reader = Reader2(self.path)
            self._reader.open()
        except Exception as err:  # rosbags raises several unrelated types for damaged files
            self._reader = None
            mcap = self._mcap_file()
            if mcap is None:
                raise BagError(f'{self.path}: cannot open bag: {err} (truncated or corrupt '
                               'file?); nothing could be read') from None
            self.recovered = True
            self.open_error = f'{type(err).__name__}: {err}'
            self._recovery = _McapRecovery(mcap)
            self.storage = 'mcap'
            self._conns = self._recovery.scan_channels()
            self._register_msgdefs()
            return
        self.storage = 'rosbag1' if self.ros1 else self._storage_from_files()
        for conn in self._reader.connections:
            c = self._conns.setdefault(conn.topic, _Conn(conn.topic, conn.msgtype, count=0))
            c.handles.append(conn)
            c.count = (c.count or 0) + int(conn.msgcount)
            fmt = getattr(conn.msgdef, 'format', None)
            if getattr(fmt, 'name', '') == 'MSG':
                c.msgdef = conn.msgdef.data
        self._register_msgdefs()

    def close(self) -> None:
        """Release the files."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def _storage_from_files(self) -> str:
        names = [f.suffix for f in bag_files(self.path)]
        return 'mcap' if '.mcap' in names else 'sqlite3' if '.db3' in names else 'unknown'

    def _mcap_file(self) -> Optional[Path]:
        if self.path.is_file():
            return self.path if self.path.suffix == '.mcap' else None
        found = sorted(self.path.glob('*.mcap'))
        return found[0] if len(found) == 1 else None

    def _register_msgdefs(self) -> None:
        """Register types the typestore lacks from the definitions stored in the bag."""
        from rosbags.typesys import get_types_from_msg
        for c in self._conns.values():
            if c.msgtype in self.typestore.fielddefs or not c.msgdef:
                continue
            try:
                self.typestore.register(get_types_from_msg(c.msgdef, c.msgtype))
            except Exception:  # noqa: S110  the message decode names the type later
                pass

    # -- queries -----------------------------------------------------------------------------
    @property
    def topics(self) -> dict[str, str]:
        """Topic -> message type."""
        return {t: c.msgtype for t, c in self._conns.items()}

    @property
    def message_counts(self) -> dict[str, Optional[int]]:
        """Topic -> number of messages (None when unknown, as in a recovered bag)."""
        return {t: c.count for t, c in self._conns.items()}

    def camera_topics(self) -> list[str]:
        """Topics carrying sensor_msgs/Image or CompressedImage, sorted."""
        return sorted(t for t, typ in self.topics.items() if typ in CAMERA_TYPES)

    def require_topics(self, topics: Iterable[str], types: Sequence[str] = ()) -> None:
        """Raise a BagError naming each topic that is missing (or has a type not in ``types``)."""
        have = self.topics
        for topic in topics:
            if topic not in have:
                listing = ', '.join(f'{t} ({typ})' for t, typ in sorted(have.items())) or 'none'
                raise BagError(f'{self.path}: topic {topic!r} is not in the bag; it has: '
                               f'{listing}')
            if types and have[topic] not in types:
                raise BagError(f'{self.path}: topic {topic!r} has type {have[topic]}, expected '
                               f'one of {", ".join(types)}')

    # -- iteration ---------------------------------------------------------------------------
    def messages(self, topics: Iterable[str]) -> Iterator[BagMessage]:
        """Yield decoded messages of ``topics`` in storage order (the recorder's log time).

        Raises BagError naming the topic and message index when a message cannot be read or
        decoded; the messages before it have been yielded.
        """
        wanted = list(topics)
        self.require_topics(wanted)
        counters = dict.fromkeys(wanted, 0)
        if self.recovered:
            source = self._recovery.messages(set(wanted))
        else:
            if self._reader is None:
                raise BagError(f'{self.path}: bag is not open')
            handles = [h for t in wanted for h in self._conns[t].handles]
            source = ((c.topic, ts, raw) for c, ts, raw in self._reader.messages(handles))
        deserialize = (self.typestore.deserialize_ros1 if self.ros1 else
                       self.typestore.deserialize_cdr)
        while True:
            try:
                item = next(source)
            except StopIteration:
                return
            except _Truncated as err:
                where = (f'topic {err.topic!r} message {counters[err.topic]}'
                         if err.topic in counters else 'a message of another topic')
                raise BagError(f'{self.path}: bag is truncated or corrupt at byte {err.offset} '
                               f'inside {where}: {err.reason}; '
                               f'{self._progress(counters)}') from None
            except Exception as err:  # storage errors of rosbags / sqlite / decompressors
                raise BagError(f'{self.path}: cannot read the next message ({type(err).__name__}:'
                               f' {err}); {self._progress(counters)}') from None
            topic, log_time_ns, raw = item
            index = counters[topic]
            msgtype = self._conns[topic].msgtype
            if msgtype not in self.typestore.fielddefs:
                raise BagError(f'{self.path}: topic {topic!r} message {index}: unknown message '
                               f'type {msgtype!r} (no definition in the bag or in rosbags)')
            try:
                msg = deserialize(bytes(raw), msgtype)
            except Exception as err:
                raise BagError(f'{self.path}: topic {topic!r} message {index}: cannot decode '
                               f'{msgtype} ({type(err).__name__}: {err}); corrupt or truncated '
                               f'message') from None
            counters[topic] = index + 1
            yield BagMessage(topic, msgtype, index, int(log_time_ns), msg)

    @staticmethod
    def _progress(counters: dict[str, int]) -> str:
        return 'read before that: ' + ', '.join(f'{t}: {n} messages'
                                                for t, n in counters.items())


# --------------------------------------------------------------------------------------------
# MCAP recovery: read records in file order up to the damage

class _Truncated(Exception):
    def __init__(self, offset: int, reason: str, topic: Optional[str] = None) -> None:
        super().__init__(reason)
        self.offset, self.reason, self.topic = offset, reason, topic


_MCAP_MAGIC = b'\x89MCAP0\r\n'


class _McapRecovery:
    """Sequential MCAP record parser for files whose summary is missing or damaged."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def scan_channels(self) -> dict[str, _Conn]:
        conns: dict[str, _Conn] = {}
        try:
            for _ in self._records(want_messages=False, conns=conns, wanted=set()):
                pass
        except _Truncated:
            pass
        return conns

    def messages(self, wanted: set[str]) -> Iterator[tuple[str, int, bytes]]:
        return self._records(want_messages=True, conns={}, wanted=wanted)

    def _records(self, want_messages: bool, conns: dict[str, _Conn], wanted: set[str]
                 ) -> Iterator[tuple[str, int, bytes]]:
        data = self.path.read_bytes()
        if not data.startswith(_MCAP_MAGIC):
            raise _Truncated(0, 'not an MCAP file (bad magic)')
        schemas: dict[int, tuple[str, str]] = {}
        channels: dict[int, str] = {}
        yield from self._parse(memoryview(data), len(_MCAP_MAGIC), 0, schemas, channels, conns,
                               wanted if want_messages else None)

    def _parse(self, buf: memoryview, pos: int, base: int, schemas: dict, channels: dict,
               conns: dict, wanted: Optional[set]) -> Iterator[tuple[str, int, bytes]]:
        end = len(buf)
        while pos < end:
            if end - pos < 9:
                raise _Truncated(base + pos, 'record header cut short')
            op = buf[pos]
            (length,) = struct.unpack_from('<Q', buf, pos + 1)
            body = buf[pos + 9:pos + 9 + length]
            short = len(body) < length
            if op == 0x02 and not short:  # footer
                return
            if op == 0x05:  # message: channel u16, sequence u32, log_time u64, publish u64
                topic = None
                if len(body) >= 2:
                    topic = channels.get(struct.unpack_from('<H', body, 0)[0])
                if short or len(body) < 22:
                    raise _Truncated(base + pos, 'message cut short', topic)
                if wanted is not None and topic in wanted:
                    (log_time,) = struct.unpack_from('<Q', body, 6)
                    yield topic, log_time, bytes(body[22:])
            elif op == 0x06:  # chunk; an uncompressed one is read up to where it was cut
                yield from self._chunk(body, base + pos + 9, short, schemas, channels, conns,
                                       wanted)
                if short:
                    raise _Truncated(base + pos, 'chunk cut short')
            elif short:
                raise _Truncated(base + pos, f'record (opcode 0x{op:02x}) cut short')
            elif op == 0x03:  # schema: id u16, name, encoding, data
                sid, p = struct.unpack_from('<H', body, 0)[0], 2
                name, p = _mcap_str(body, p)
                _enc, p = _mcap_str(body, p)
                (n,) = struct.unpack_from('<I', body, p)
                schemas[sid] = (name, bytes(body[p + 4:p + 4 + n]).decode(errors='replace'))
            elif op == 0x04:  # channel: id u16, schema u16, topic, encoding, metadata
                cid, sid = struct.unpack_from('<HH', body, 0)
                topic, _ = _mcap_str(body, 4)
                channels[cid] = topic
                name, msgdef = schemas.get(sid, ('', ''))
                conns.setdefault(topic, _Conn(topic, _ros2_name(name), msgdef))
            pos += 9 + length

    def _chunk(self, body: memoryview, offset: int, short: bool, schemas: dict, channels: dict,
               conns: dict, wanted: Optional[set]) -> Iterator[tuple[str, int, bytes]]:
        # start u64, end u64, uncompressed size u64, crc u32, compression, records (u64 + bytes)
        try:
            compression, p = _mcap_str(body, 28)
            (n,) = struct.unpack_from('<Q', body, p)
        except struct.error:
            raise _Truncated(offset, 'chunk header cut short') from None
        records = body[p + 8:p + 8 + n]
        if short and compression:
            raise _Truncated(offset, f'{compression}-compressed chunk cut short')
        if compression == 'zstd':
            from backports import zstd  # a dependency of rosbags
            records = memoryview(zstd.decompress(bytes(records)))
        elif compression == 'lz4':
            import lz4.frame  # a dependency of rosbags
            records = memoryview(lz4.frame.decompress(bytes(records)))
        elif compression:
            raise _Truncated(offset, f'unknown chunk compression {compression!r}')
        yield from self._parse(records, 0, offset + p + 8, schemas, channels, conns, wanted)


def _mcap_str(buf: memoryview, pos: int) -> tuple[str, int]:
    (n,) = struct.unpack_from('<I', buf, pos)
    return bytes(buf[pos + 4:pos + 4 + n]).decode(errors='replace'), pos + 4 + n


def _ros2_name(name: str) -> str:
    """'sensor_msgs/Image' or 'sensor_msgs/msg/Image' -> 'sensor_msgs/msg/Image'."""
    parts = name.split('/')
    return f'{parts[0]}/msg/{parts[1]}' if len(parts) == 2 else name


# --------------------------------------------------------------------------------------------
# Image decoding (no cv_bridge)

def decode_image(msg: Any, msgtype: str, topic: str = '?', index: int = -1) -> np.ndarray:
    """Convert a sensor_msgs/Image or CompressedImage to an uint8 (H, W, 3) RGB array.

    Raises BagError naming ``topic`` and ``index`` for encodings the pipeline cannot take.
    """
    img = _decode_image(msg, msgtype, topic, index)
    return img if img.flags.writeable and img.flags.c_contiguous else img.copy()


def _decode_image(msg: Any, msgtype: str, topic: str, index: int) -> np.ndarray:
    import cv2
    where = f'topic {topic!r} message {index}'
    if msgtype == COMPRESSED_TYPE:
        fmt = str(msg.format)
        if 'compresseddepth' in fmt.lower().replace(' ', ''):
            raise BagError(f'{where}: compressedDepth images ({fmt!r}) are depth, not camera '
                           'frames')
        buf = np.frombuffer(bytes(msg.data), np.uint8)
        img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED) if buf.size else None
        if img is None:
            raise BagError(f'{where}: CompressedImage (format {fmt!r}, {buf.size} bytes) could '
                           'not be decoded by OpenCV')
        if img.dtype == np.uint16:
            img = (img >> 8).astype(np.uint8)
        if img.ndim == 2:
            return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
        if img.shape[2] == 4:
            return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
        # OpenCV decodes to BGR; a 'rgb8; jpeg compressed rgb8' payload was RGB before encoding.
        if fmt.replace(' ', '').endswith('compressedrgb8'):
            return np.ascontiguousarray(img)
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    if msgtype != IMAGE_TYPE:
        raise BagError(f'{where}: type {msgtype} is not a camera image '
                       f'({", ".join(CAMERA_TYPES)})')
    enc = str(msg.encoding)
    h, w, step = int(msg.height), int(msg.width), int(msg.step)
    data = np.asarray(msg.data, dtype=np.uint8)
    if h <= 0 or w <= 0:
        raise BagError(f'{where}: empty image ({w}x{h})')
    if data.size < h * step:
        raise BagError(f'{where}: image data has {data.size} bytes, {enc} {w}x{h} with step '
                       f'{step} needs {h * step}')
    rows = data[:h * step].reshape(h, step)
    if enc in _RGB_CHANNELS:
        c = _RGB_CHANNELS[enc]
        img = rows[:, :w * c].reshape(h, w, c)
        if enc in ('rgb8', 'rgba8'):
            return np.ascontiguousarray(img[..., :3])
        return np.ascontiguousarray(img[..., 2::-1])  # bgr(a)8 and 8UC3/8UC4 (OpenCV order)
    if enc in _MONO8:
        return np.repeat(rows[:, :w, None], 3, axis=2)
    if enc in _MONO16:
        px = rows[:, :w * 2].copy().view('>u2' if msg.is_bigendian else '<u2').reshape(h, w)
        return np.repeat((px >> 8).astype(np.uint8)[..., None], 3, axis=2)
    if enc in _BAYER:
        code = getattr(cv2, f'COLOR_Bayer{_BAYER[enc]}2RGB')
        return cv2.cvtColor(np.ascontiguousarray(rows[:, :w]), code)
    if enc in _YUV:
        packed = np.ascontiguousarray(rows[:, :w * 2].reshape(h, w, 2))
        return cv2.cvtColor(packed, getattr(cv2, f'COLOR_YUV2RGB_{_YUV[enc]}'))
    raise BagError(f'{where}: image encoding {enc!r} cannot be converted to RGB for the '
                   f'pipeline; supported: {", ".join(SUPPORTED_ENCODINGS)}')


def decode_mask(msg: Any, msgtype: str, topic: str = '?', index: int = -1) -> np.ndarray:
    """Convert a mono8 Image (or PNG CompressedImage) to uint8 (H, W) class ids."""
    import cv2
    where = f'topic {topic!r} message {index}'
    if msgtype == COMPRESSED_TYPE:
        img = cv2.imdecode(np.frombuffer(bytes(msg.data), np.uint8), cv2.IMREAD_UNCHANGED)
        if img is None or img.ndim != 2 or img.dtype != np.uint8:
            raise BagError(f'{where}: mask must be a single-channel 8-bit PNG')
        return img
    if msgtype != IMAGE_TYPE or str(msg.encoding) not in _MONO8:
        enc = getattr(msg, 'encoding', msgtype)
        raise BagError(f'{where}: ground-truth mask must be a mono8 sensor_msgs/Image of class '
                       f'ids, got {enc!r}')
    h, w, step = int(msg.height), int(msg.width), int(msg.step)
    data = np.asarray(msg.data, dtype=np.uint8)
    if data.size < h * step:
        raise BagError(f'{where}: mask data has {data.size} bytes, needs {h * step}')
    return np.ascontiguousarray(data[:h * step].reshape(h, step)[:, :w])


def decode_detections(msg: Any, class_names: Sequence[str], topic: str = '?', index: int = -1
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Convert a Detection2DArray to (boxes_xyxy_px, class_ids, scores, n_unknown_class).

    Each detection's best hypothesis gives the class: its ``class_id`` is a class name of
    ``class_names`` or an integer index into it. Detections of other classes are dropped and
    counted in ``n_unknown_class``.
    """
    lookup = {name: i for i, name in enumerate(class_names)}
    boxes, ids, scores = [], [], []
    unknown = 0
    for det in msg.detections:
        if not det.results:
            raise BagError(f'topic {topic!r} message {index}: a detection has no hypothesis '
                           '(results[] is empty), so it has no class')
        best = max(det.results, key=lambda r: r.hypothesis.score)
        cls = str(best.hypothesis.class_id)
        cid = lookup.get(cls)
        if cid is None and cls.lstrip('-').isdigit() and 0 <= int(cls) < len(class_names):
            cid = int(cls)
        if cid is None:
            unknown += 1
            continue
        cx, cy = float(det.bbox.center.position.x), float(det.bbox.center.position.y)
        sw, sh = float(det.bbox.size_x), float(det.bbox.size_y)
        boxes.append([cx - sw / 2, cy - sh / 2, cx + sw / 2, cy + sh / 2])
        ids.append(cid)
        scores.append(float(best.hypothesis.score))
    return (np.asarray(boxes, np.float64).reshape(-1, 4), np.asarray(ids, np.int64),
            np.asarray(scores, np.float64), unknown)


# --------------------------------------------------------------------------------------------
# Message building (sample bags, test bags, prediction bags)

def _header(store: Any, stamp_ns: int, frame_id: str) -> Any:
    time_t = store.types['builtin_interfaces/msg/Time']
    header_t = store.types['std_msgs/msg/Header']
    return header_t(stamp=time_t(sec=stamp_ns // 1_000_000_000, nanosec=stamp_ns % 1_000_000_000),
                    frame_id=frame_id)


def image_msg(store: Any, rgb: np.ndarray, stamp_ns: int, frame_id: str = 'camera',
              encoding: str = 'rgb8') -> Any:
    """Build a sensor_msgs/Image (rgb8, bgr8, mono8) from uint8 RGB (H, W, 3) or mono (H, W)."""
    if encoding == 'bgr8':
        arr = np.ascontiguousarray(rgb[..., ::-1])
    elif encoding in ('rgb8', 'mono8'):
        arr = np.ascontiguousarray(rgb)
    else:
        raise ValueError(f'image_msg writes rgb8, bgr8 or mono8, not {encoding!r}')
    h, w = arr.shape[:2]
    channels = 1 if arr.ndim == 2 else arr.shape[2]
    return store.types[IMAGE_TYPE](
        header=_header(store, stamp_ns, frame_id), height=h, width=w, encoding=encoding,
        is_bigendian=0, step=w * channels, data=arr.reshape(-1))


def compressed_msg(store: Any, rgb: np.ndarray, stamp_ns: int, frame_id: str = 'camera',
                   fmt: str = 'jpeg', quality: int = 90) -> Any:
    """Build a sensor_msgs/CompressedImage (JPEG or PNG) from an uint8 RGB (H, W, 3) array."""
    import cv2
    ext = '.jpg' if fmt == 'jpeg' else '.png'
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)] if fmt == 'jpeg' else []
    img = rgb if rgb.ndim == 2 else cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(ext, img, params)
    if not ok:
        raise ValueError(f'OpenCV could not encode a {fmt} image')
    return store.types[COMPRESSED_TYPE](header=_header(store, stamp_ns, frame_id), format=fmt,
                                        data=np.asarray(buf, np.uint8).reshape(-1))


def detections_msg(store: Any, stamp_ns: int, boxes_xyxy_px: np.ndarray,
                   class_ids: Sequence[str], scores: Optional[Sequence[float]] = None,
                   frame_id: str = 'camera') -> Any:
    """Boxes (n, 4) xyxy + class id strings (+ scores) -> vision_msgs/Detection2DArray."""
    t = store.types
    header = _header(store, stamp_ns, frame_id)
    boxes = np.asarray(boxes_xyxy_px, np.float64).reshape(-1, 4)
    scores = [1.0] * len(boxes) if scores is None else list(scores)
    dets = []
    for box, cls, score in zip(boxes, class_ids, scores, strict=True):
        hyp = t['vision_msgs/msg/ObjectHypothesisWithPose'](
            hypothesis=t['vision_msgs/msg/ObjectHypothesis'](class_id=str(cls),
                                                             score=float(score)),
            pose=_zero_pose(store))
        bbox = t['vision_msgs/msg/BoundingBox2D'](
            center=t['vision_msgs/msg/Pose2D'](
                position=t['vision_msgs/msg/Point2D'](x=float(box[0] + box[2]) / 2,
                                                      y=float(box[1] + box[3]) / 2),
                theta=0.0),
            size_x=float(box[2] - box[0]), size_y=float(box[3] - box[1]))
        dets.append(t['vision_msgs/msg/Detection2D'](header=header, results=[hyp], bbox=bbox,
                                                      id=''))
    return t[DETECTIONS_TYPE](header=header, detections=dets)


def _zero_pose(store: Any) -> Any:
    t = store.types
    pose = t['geometry_msgs/msg/Pose'](
        position=t['geometry_msgs/msg/Point'](x=0.0, y=0.0, z=0.0),
        orientation=t['geometry_msgs/msg/Quaternion'](x=0.0, y=0.0, z=0.0, w=1.0))
    return t['geometry_msgs/msg/PoseWithCovariance'](pose=pose,
                                                     covariance=np.zeros(36, np.float64))


class BagWriter:
    """Thin wrapper over ``rosbags.rosbag2.Writer``: add topics by type, write messages."""

    def __init__(self, path: os.PathLike | str, storage: str = 'mcap') -> None:
        from rosbags.rosbag2 import StoragePlugin, Writer
        if storage not in ('mcap', 'sqlite3'):
            raise ValueError(f"storage must be 'mcap' or 'sqlite3', got {storage!r}")
        plugin = StoragePlugin.MCAP if storage == 'mcap' else StoragePlugin.SQLITE3
        self.path = Path(path)
        if self.path.exists():
            raise BagError(f'{self.path}: exists already, not overwriting')
        self.store = make_typestore()
        self._writer = Writer(self.path, version=9, storage_plugin=plugin)
        self._conns: dict[str, Any] = {}

    def __enter__(self) -> BagWriter:
        self._writer.open()
        return self

    def __exit__(self, *exc: object) -> bool:
        self._writer.close()
        return False

    def write(self, topic: str, msgtype: str, msg: Any, log_time_ns: int) -> None:
        """Serialise ``msg`` (a typestore message of ``msgtype``) onto ``topic``."""
        conn = self._conns.get(topic)
        if conn is None:
            conn = self._writer.add_connection(topic, msgtype, typestore=self.store)
            self._conns[topic] = conn
        self._writer.write(conn, int(log_time_ns), self.store.serialize_cdr(msg, msgtype))


__all__ = ['CAMERA_TYPES', 'COMPRESSED_TYPE', 'DETECTIONS_TYPE', 'IMAGE_TYPE',
           'SUPPORTED_ENCODINGS', 'VISION_MSGS', 'BagMessage', 'BagReader', 'BagWriter',
           'bag_files', 'bag_hash', 'compressed_msg', 'decode_detections', 'decode_image',
           'decode_mask', 'detections_msg', 'find_bags', 'header_stamp_ns', 'image_msg',
           'make_typestore', 'stamp_to_ns']
