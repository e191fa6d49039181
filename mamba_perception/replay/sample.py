"""Build the sample bag from real video: OpenCV's ``vtest.avi`` (768x576, 795 frames, 10 fps).

The bag is a rosbag2 (MCAP by default) with the same frames on two topics, as a camera driver
with image_transport would record them:

* ``/camera/image_raw`` (``sensor_msgs/Image``, bgr8) and
* ``/camera/image_raw/compressed`` (``sensor_msgs/CompressedImage``, JPEG).

Header stamps (and log times) are ``START_STAMP_NS + frame_number * 100 ms``, so the bag plays at
the video's recorded 10 fps. Run ``python -m mamba_perception.replay.sample OUT`` to build one.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
import sys
from typing import Optional, Sequence

import numpy as np

from mamba_perception.errors import SetupError
from mamba_perception.replay.bag import (
    COMPRESSED_TYPE,
    IMAGE_TYPE,
    BagWriter,
    compressed_msg,
    image_msg,
)

VIDEO_ENV = 'MAMBA_PERCEPTION_SAMPLE_VIDEO'
SYSTEM_VIDEO = Path('/usr/share/doc/opencv-doc/examples/data/vtest.avi')
RAW_TOPIC = '/camera/image_raw'
COMPRESSED_TOPIC = '/camera/image_raw/compressed'
FRAME_ID = 'camera_optical_frame'
START_STAMP_NS = 1_700_000_000 * 1_000_000_000
FRAME_PERIOD_NS = 100_000_000  # vtest.avi is 10 fps


def video_candidates() -> list[Path]:
    """Where :func:`find_sample_video` looks, in order."""
    out = []
    if os.environ.get(VIDEO_ENV):
        out.append(Path(os.environ[VIDEO_ENV]))
    out += [SYSTEM_VIDEO, Path(sys.prefix) / 'share' / 'mamba_perception_data' / 'vtest.avi']
    return out


def find_sample_video() -> Path:
    """Path of ``vtest.avi``; raises SetupError naming every place looked at."""
    candidates = video_candidates()
    for path in candidates:
        if path.is_file():
            return path
    places = '\n  '.join(str(p) for p in candidates)
    raise SetupError(
        "OpenCV's sample video vtest.avi was not found. Looked at:\n  " + places + '\n'
        f'Set ${VIDEO_ENV} to a copy, run `tools/dev setup` (it extracts the file from Debian\'s '
        'opencv-doc package), or `apt-get install opencv-doc`.')


def read_frames(video: os.PathLike | str, count: Optional[int] = None, start: int = 0,
                stride: int = 1, scale: float = 1.0) -> list[tuple[int, np.ndarray]]:
    """(frame number, uint8 RGB frame) pairs: ``count`` frames from ``start``, every ``stride``.

    ``scale`` < 1 downsizes (INTER_AREA), for small test bags.
    """
    import cv2
    cap = cv2.VideoCapture(str(video))
    if not cap.isOpened():
        raise SetupError(f'{video}: OpenCV cannot open this video')
    frames = []
    number = 0
    try:
        while count is None or len(frames) < count:
            ok, bgr = cap.read()
            if not ok:
                break
            if number >= start and (number - start) % stride == 0:
                if scale != 1.0:
                    h, w = bgr.shape[:2]
                    bgr = cv2.resize(bgr, (max(1, round(w * scale)), max(1, round(h * scale))),
                                     interpolation=cv2.INTER_AREA)
                frames.append((number, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)))
            number += 1
    finally:
        cap.release()
    if not frames:
        raise SetupError(f'{video}: no frames could be read (start {start}, stride {stride})')
    return frames


def frame_stamp_ns(number: int) -> int:
    """Header stamp of video frame ``number``."""
    return START_STAMP_NS + number * FRAME_PERIOD_NS


def build_sample_bag(out: os.PathLike | str, video: Optional[os.PathLike | str] = None,
                     count: Optional[int] = 100, start: int = 0, stride: int = 1,
                     scale: float = 1.0, storage: str = 'mcap', raw: bool = True,
                     compressed: bool = True, jpeg_quality: int = 90) -> Path:
    """Write the sample bag to ``out`` (a new rosbag2 folder) and return its path."""
    frames = read_frames(video or find_sample_video(), count, start, stride, scale)
    with BagWriter(out, storage) as writer:
        for number, rgb in frames:
            stamp = frame_stamp_ns(number)
            if raw:
                writer.write(RAW_TOPIC, IMAGE_TYPE,
                             image_msg(writer.store, rgb, stamp, FRAME_ID, 'bgr8'), stamp)
            if compressed:
                writer.write(COMPRESSED_TOPIC, COMPRESSED_TYPE,
                             compressed_msg(writer.store, rgb, stamp, FRAME_ID, 'jpeg',
                                            jpeg_quality), stamp)
    return Path(out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Build the sample bag (command line)."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('out', help='new rosbag2 folder to write')
    parser.add_argument('--video', help='video file (default: vtest.avi, see find_sample_video)')
    parser.add_argument('--frames', type=int, default=100, help='number of frames (default 100)')
    parser.add_argument('--start', type=int, default=0, help='first video frame')
    parser.add_argument('--stride', type=int, default=1, help='take every n-th frame')
    parser.add_argument('--scale', type=float, default=1.0, help='resize factor (default 1)')
    parser.add_argument('--storage', choices=('mcap', 'sqlite3'), default='mcap')
    args = parser.parse_args(argv)
    try:
        path = build_sample_bag(args.out, args.video, args.frames, args.start, args.stride,
                                args.scale, args.storage)
    except Exception as err:  # noqa: BLE001  a command prints, it does not trace back
        print(f'error: {err}', file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == '__main__':
    sys.exit(main())
