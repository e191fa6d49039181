"""Pure conversions: every encoding, zero-copy views, bad inputs, and output messages."""

import array

import cv2
import numpy as np
import pytest
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header

from mamba_perception.errors import InputError
from mamba_perception.results import Detections, FrameResult
from mamba_perception.ros import conversions


@pytest.fixture(scope='module')
def rgb(video_frames_bgr):
    return np.ascontiguousarray(video_frames_bgr[3][..., ::-1])


def make_image(pixels, encoding, step=None, pad=0):
    pixels = np.ascontiguousarray(pixels)
    h, w = pixels.shape[:2]
    row = pixels.reshape(h, -1)
    if pad:
        row = np.concatenate([row, np.zeros((h, pad), np.uint8)], axis=1)
    msg = Image(height=h, width=w, encoding=encoding, step=step or row.shape[1])
    data = array.array('B')
    data.frombytes(np.ascontiguousarray(row).data)
    msg.data = data
    return msg


def compressed(data, fmt='bgr8; jpeg compressed bgr8'):
    msg = CompressedImage(format=fmt)
    buf = array.array('B')
    buf.frombytes(bytes(data))
    msg.data = buf
    return msg


@pytest.mark.parametrize('encoding', ['rgb8', 'bgr8', 'rgba8', 'bgra8'])
def test_colour_encodings_are_zero_copy_views(rgb, encoding):
    order = {'rgb8': rgb, 'bgr8': rgb[..., ::-1],
             'rgba8': np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)]),
             'bgra8': np.dstack([rgb[..., ::-1], np.full(rgb.shape[:2], 7, np.uint8)])}[encoding]
    msg = make_image(order, encoding)
    out = conversions.image_to_rgb(msg)
    np.testing.assert_array_equal(out, rgb)
    assert np.shares_memory(out, np.frombuffer(msg.data, np.uint8))  # no copy
    assert not out.flags.writeable


def encoded(rgb, encoding):
    return {'rgb8': rgb, 'bgr8': rgb[..., ::-1], 'mono8': rgb[..., 1],
            'rgba8': np.dstack([rgb, np.full(rgb.shape[:2], 9, np.uint8)]),
            'bgra8': np.dstack([rgb[..., ::-1], np.zeros(rgb.shape[:2], np.uint8)])}[encoding]


@pytest.mark.parametrize('staged', [False, True])
@pytest.mark.parametrize('encoding', ['rgb8', 'bgr8', 'rgba8', 'bgra8', 'mono8'])
@pytest.mark.parametrize('pad', [0, 8])
def test_device_path_matches_host_path(rgb, encoding, pad, staged):
    msg = make_image(encoded(rgb, encoding), encoding, pad=pad)
    staging = conversions.HostStaging() if staged else None
    out = conversions.image_to_device_rgb(msg, 'cpu', staging=staging)
    np.testing.assert_array_equal(out.numpy(), conversions.image_to_rgb(msg))


def staged_frames_stay_independent(device):
    """One staging, frames of two sizes and encodings: each result keeps its own pixels."""
    staging = conversions.HostStaging()
    rng = np.random.default_rng(3)
    frames = [rng.integers(0, 256, (48, 64, 3), np.uint8),
              rng.integers(0, 256, (96, 128, 3), np.uint8),  # larger: the buffer grows
              rng.integers(0, 256, (48, 64, 3), np.uint8)]
    msgs = [make_image(encoded(f, enc), enc, pad=pad)
            for f, enc, pad in zip(frames, ['bgr8', 'rgba8', 'mono8'], [4, 0, 8],
                                   strict=True)]
    outs = [conversions.image_to_device_rgb(m, device, staging=staging) for m in msgs]
    for out, msg in zip(outs, msgs, strict=True):
        assert out.device.type == device.split(':')[0]
        np.testing.assert_array_equal(out.cpu().numpy(), conversions.image_to_rgb(msg))


def test_staged_frames_stay_independent_on_cpu():
    staged_frames_stay_independent('cpu')


@pytest.mark.gpu
def test_staged_upload_to_cuda():  # page-locked staging, asynchronous copies
    staged_frames_stay_independent('cuda')


def test_row_padding_is_honoured(rgb):
    msg = make_image(rgb, 'rgb8', pad=16)
    assert msg.step == rgb.shape[1] * 3 + 16
    np.testing.assert_array_equal(conversions.image_to_rgb(msg), rgb)


def test_mono8(rgb):
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    out = conversions.image_to_rgb(make_image(grey, 'mono8'))
    assert out.shape == rgb.shape
    np.testing.assert_array_equal(out[..., 0], grey)
    np.testing.assert_array_equal(out[..., 2], grey)


@pytest.mark.parametrize('encoding', ['uyvy', 'yuv422', 'yuyv', 'yuv422_yuy2'])
def test_yuv422(rgb, encoding):
    uyvy = encoding in ('uyvy', 'yuv422')
    packed = cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_UYVY if uyvy else cv2.COLOR_RGB2YUV_YUY2)
    out = conversions.image_to_rgb(make_image(packed, encoding))
    assert out.shape == rgb.shape
    assert np.abs(out.astype(int) - rgb).mean() < 6  # chroma subsampling loses a little
    other = 'yuyv' if uyvy else 'uyvy'  # the other byte order must give a wrong picture
    wrong = conversions.image_to_rgb(make_image(packed, other))
    assert np.abs(wrong.astype(int) - rgb).mean() > 20


@pytest.mark.parametrize('encoding,offsets', [
    ('bayer_rggb8', ((0, 0), (0, 1), (1, 0), (1, 1))),
    ('bayer_bggr8', ((1, 1), (0, 1), (1, 0), (0, 0))),
    ('bayer_gbrg8', ((1, 0), (0, 0), (1, 1), (0, 1))),
    ('bayer_grbg8', ((0, 1), (0, 0), (1, 1), (1, 0))),
])
def test_bayer_patterns(rgb, encoding, offsets):
    """Mosaic a real frame with the named pattern; demosaicing must restore its colours."""
    (ry, rx), (g1y, g1x), (g2y, g2x), (by, bx) = offsets
    mosaic = np.zeros(rgb.shape[:2], np.uint8)
    mosaic[ry::2, rx::2] = rgb[ry::2, rx::2, 0]
    mosaic[g1y::2, g1x::2] = rgb[g1y::2, g1x::2, 1]
    mosaic[g2y::2, g2x::2] = rgb[g2y::2, g2x::2, 1]
    mosaic[by::2, bx::2] = rgb[by::2, bx::2, 2]
    out = conversions.image_to_rgb(make_image(mosaic, encoding)).astype(int)
    error = np.abs(out - rgb).mean(axis=(0, 1))
    swapped = np.abs(out[..., ::-1] - rgb).mean(axis=(0, 1))
    assert error.max() < 12, error
    assert error[[0, 2]].sum() < swapped[[0, 2]].sum()  # red and blue not swapped


@pytest.mark.parametrize('mutate,match', [
    (lambda m: setattr(m, 'encoding', '32FC1'), 'unsupported encoding'),
    (lambda m: setattr(m, 'encoding', 'nonsense'), 'unsupported encoding'),
    (lambda m: setattr(m, 'step', m.width * 3 - 1), 'step'),
    (lambda m: setattr(m, 'step', m.step + 4), 'expected step'),
    (lambda m: setattr(m, 'data', m.data[:-10]), 'bytes'),
    (lambda m: (setattr(m, 'width', 0), setattr(m, 'height', 0)), 'empty'),
    (lambda m: setattr(m, 'height', m.height + 1), 'bytes'),
])
def test_inconsistent_images_raise_input_error(rgb, mutate, match):
    msg = make_image(rgb, 'rgb8')
    mutate(msg)
    with pytest.raises(InputError, match=match):
        conversions.image_to_rgb(msg)


def test_pixel_limit(rgb):
    msg = make_image(rgb, 'rgb8')
    with pytest.raises(InputError, match='max_input_pixels'):
        conversions.image_to_rgb(msg, max_pixels=rgb.shape[0] * rgb.shape[1] - 1)
    huge = Image(width=100_000, height=100_000, encoding='rgb8', step=300_000)
    with pytest.raises(InputError, match='exceeds'):
        conversions.image_to_rgb(huge)  # rejected before the (absent) data is looked at


def test_jpeg_and_png_decode(rgb):
    bgr = rgb[..., ::-1]
    jpeg = cv2.imencode('.jpg', bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])[1]
    out = conversions.compressed_to_rgb(compressed(jpeg))
    assert out.shape == rgb.shape
    assert np.abs(out.astype(int) - rgb).mean() < 4
    png = cv2.imencode('.png', bgr)[1]
    out = conversions.compressed_to_rgb(compressed(png, 'bgr8; png compressed bgr8'))
    np.testing.assert_array_equal(out, rgb)
    assert conversions.compressed_size(np.asarray(jpeg).ravel()) == (rgb.shape[1], rgb.shape[0])


@pytest.mark.parametrize('corrupt,match', [
    (lambda b: b[:len(b) // 2], 'truncated'),
    (lambda b: b'', 'no data'),
    (lambda b: b'\x00' * 100, 'not a JPEG or PNG'),
    (lambda b: b[:200] + bytes(range(256)) * 8 + b'\xff\xd9', 'cannot decode|decoded'),
])
def test_corrupt_jpeg_raises_input_error(rgb, corrupt, match):
    jpeg = cv2.imencode('.jpg', rgb[..., ::-1])[1].tobytes()
    with pytest.raises(InputError, match=match):
        conversions.compressed_to_rgb(compressed(corrupt(jpeg)))


def test_compressed_pixel_limit_checked_from_header(rgb):
    jpeg = cv2.imencode('.jpg', rgb[..., ::-1])[1]
    with pytest.raises(InputError, match='max_input_pixels'):
        conversions.compressed_to_rgb(compressed(jpeg), max_pixels=1000)


@pytest.mark.gpu
def test_jpeg_decode_on_gpu(rgb):
    jpeg = cv2.imencode('.jpg', rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])[1]
    out = conversions.compressed_to_rgb(compressed(jpeg), decoder='gpu', device='cuda')
    assert out.is_cuda and tuple(out.shape) == rgb.shape
    assert np.abs(out.cpu().numpy().astype(int) - rgb).mean() < 4


def result_with(boxes, scores, ids, h=288, w=384, mask=True):
    return FrameResult(h, w, Detections(np.asarray(boxes, np.float32).reshape(-1, 4),
                                        np.asarray(scores, np.float32),
                                        np.asarray(ids, np.int64)),
                       np.full((h, w), 2, np.uint8) if mask else None)


def test_detections_message_copies_header_and_uses_source_pixels():
    header = Header(frame_id='cam_front_optical')
    header.stamp.sec, header.stamp.nanosec = 1234, 5678
    result = result_with([[10, 20, 50, 100], [0, 0, 384, 288]], [0.9, 0.4], [2, 0])
    msg = conversions.detections_to_msg(result, header)
    assert msg.header == header
    assert len(msg.detections) == 2
    first = msg.detections[0]
    assert first.header == header
    assert (first.bbox.center.position.x, first.bbox.center.position.y) == (30.0, 60.0)
    assert (first.bbox.size_x, first.bbox.size_y) == (40.0, 80.0)
    assert first.bbox.center.theta == 0.0
    assert first.results[0].hypothesis.class_id == '2'
    assert first.results[0].hypothesis.score == pytest.approx(0.9)
    assert msg.detections[1].results[0].hypothesis.class_id == '0'
    empty = conversions.detections_to_msg(FrameResult(5, 5), header)
    assert empty.header == header and empty.detections == []


@pytest.mark.parametrize('boxes', [0, 1, 2, 7, 23])
@pytest.mark.parametrize('frame_id', ['', 'c', 'cam', 'cam_front', 'camera_front_optical'])
def test_serialized_detections_are_the_message_rclpy_would_send(boxes, frame_id):
    # The node publishes detections_to_cdr's bytes; rclpy must read them back as exactly the
    # message detections_to_msg builds, whatever the string lengths do to CDR alignment
    # (class ids of 1-4 digits, frame ids of 0-20 characters, negative and large stamps).
    from rclpy.serialization import deserialize_message, serialize_message
    from vision_msgs.msg import Detection2DArray

    rng = np.random.default_rng(boxes * 31 + len(frame_id))
    xy = rng.random((boxes, 2)) * 1000
    result = result_with(np.concatenate([xy, xy + rng.random((boxes, 2)) * 80], 1),
                         rng.random(boxes), rng.integers(0, 2000, boxes))
    header = Header(frame_id=frame_id)
    header.stamp.sec = int(rng.integers(-(2 ** 31), 2 ** 31 - 1))
    header.stamp.nanosec = int(rng.integers(0, 10 ** 9))
    raw = conversions.detections_to_cdr(result, header)
    want = conversions.detections_to_msg(result, header)
    assert isinstance(raw, bytes) and len(raw) == len(serialize_message(want))
    assert deserialize_message(raw, Detection2DArray) == want


@pytest.mark.parametrize('encoding, shape', [('mono8', (3, 5)), ('rgb8', (2, 7, 3)),
                                             ('bgra8', (4, 1, 4)), ('mono8', (0, 0))])
@pytest.mark.parametrize('frame_id', ['', 'c', 'ca', 'cam', 'cam_front_optical'])
def test_serialized_image_is_the_message_rclpy_would_send(encoding, shape, frame_id):
    # The node publishes its mask and overlay as image_to_cdr's bytes: rclpy must read them
    # back as array_to_image's message, whatever the strings do to alignment (same length as
    # rclpy's serialization; CDR leaves padding bytes unspecified, so not the same bytes).
    from rclpy.serialization import deserialize_message, serialize_message

    rng = np.random.default_rng(len(frame_id))
    pixels = rng.integers(0, 256, shape, dtype=np.uint8)
    header = Header(frame_id=frame_id)
    header.stamp.sec = int(rng.integers(-(2 ** 31), 2 ** 31 - 1))
    header.stamp.nanosec = int(rng.integers(0, 10 ** 9))
    raw = conversions.image_to_cdr(pixels, header, encoding)
    want = conversions.array_to_image(pixels, header, encoding)
    assert isinstance(raw, bytes) and len(raw) == len(serialize_message(want))
    assert deserialize_message(raw, Image) == want
    # a strided view (every other column) is published as its pixels, not its memory
    wide = rng.integers(0, 256, (3, 10), dtype=np.uint8)
    got = deserialize_message(conversions.image_to_cdr(wide[:, ::2], header, 'mono8'), Image)
    np.testing.assert_array_equal(np.frombuffer(got.data, np.uint8).reshape(3, 5), wide[:, ::2])


def test_mask_and_label_info_and_overlay(rgb):
    from rclpy.serialization import deserialize_message

    header = Header(frame_id='cam')
    h, w = rgb.shape[:2]
    result = result_with([[10, 20, 50, 100]], [0.9], [1], h, w)
    mask = deserialize_message(conversions.mask_to_cdr(result.class_mask, header), Image)
    assert (mask.height, mask.width, mask.encoding, mask.step) == (h, w, 'mono8', w)
    assert mask.header == header
    np.testing.assert_array_equal(np.frombuffer(mask.data, np.uint8).reshape(h, w),
                                  result.class_mask)
    info = conversions.label_info(['person', 'car'], 0.3, header)
    assert [(c.class_id, c.class_name) for c in info.class_map] == [(0, 'person'), (1, 'car')]
    assert info.threshold == pytest.approx(0.3)
    colors = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
    out = conversions.overlay(rgb, result, colors, ['a', 'b', 'c'], alpha=1.0)
    assert out.shape == rgb.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out[200, 300], [0, 0, 255])  # mask class 2, fully opaque
    np.testing.assert_array_equal(out[60, 10], [0, 255, 0])  # box edge in class 1's colour
    image = conversions.array_to_image(out, header, 'rgb8')
    assert (image.width, image.height, image.step, len(image.data)) == (w, h, w * 3, h * w * 3)


def test_check_result_rejects_non_finite_output():
    conversions.check_result(result_with([[1, 2, 3, 4]], [0.5], [0]))
    with pytest.raises(InputError, match='NaN'):
        conversions.check_result(result_with([[np.nan] * 4], [0.5], [0]))
    with pytest.raises(InputError, match='NaN'):
        conversions.check_result(result_with([[1, 2, 3, 4]], [np.nan], [0]))
    bad_mask = FrameResult(10, 10, None, np.zeros((5, 5), np.uint8))
    with pytest.raises(InputError, match='mask shape'):
        conversions.check_result(bad_mask)


@pytest.mark.parametrize('encoding,pad', [('bgr8', 0), ('rgb8', 8), ('mono8', 0)])
def test_serialized_image_decodes_like_the_rclpy_message(rgb, encoding, pad):
    """The node's input path (CDR bytes -> rosbags) gives the same frame and header as rclpy's
    message, with the pixels read in place (a view of the received bytes, not a copy)."""
    from rclpy.serialization import serialize_message
    pixels = {'bgr8': rgb[..., ::-1], 'rgb8': rgb,
              'mono8': cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)}[encoding]
    msg = make_image(pixels, encoding, pad=pad)
    msg.header.stamp.sec, msg.header.stamp.nanosec = 1_700_000_000, 123_456_789
    msg.header.frame_id = 'front_optical'
    raw = serialize_message(msg)
    got = conversions.deserialize_image(raw)
    np.testing.assert_array_equal(conversions.image_to_rgb(got), conversions.image_to_rgb(msg))
    assert np.shares_memory(np.asarray(got.data), np.frombuffer(raw, np.uint8))
    header = conversions.ros_header(got.header)
    assert isinstance(header, Header) and header == msg.header


def test_serialized_compressed_image_decodes_like_the_rclpy_message(rgb):
    from rclpy.serialization import serialize_message
    ok, encoded = cv2.imencode('.jpg', rgb[..., ::-1])
    msg = compressed(encoded.tobytes())
    msg.header.frame_id = 'left'
    got = conversions.deserialize_image(serialize_message(msg), compressed=True)
    assert got.format == msg.format and got.header.frame_id == 'left'
    np.testing.assert_array_equal(conversions.compressed_to_rgb(got),
                                  conversions.compressed_to_rgb(msg))


@pytest.mark.parametrize('cut', [0, 3, 30, -1])
def test_corrupt_serialized_image_is_an_input_error(rgb, cut):
    from rclpy.serialization import serialize_message
    raw = serialize_message(make_image(rgb, 'rgb8'))
    with pytest.raises(InputError, match='corrupt serialized sensor_msgs/msg/Image'):
        conversions.deserialize_image(raw[:cut])
