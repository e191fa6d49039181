"""Live mode: a bag of real vtest.avi frames played into a real perception_node process on DDS.

The node is started by ``replay --live`` itself (a tiny random bundle capped at 64 px, so CPU
inference takes milliseconds), fed at the bag's recorded 10 fps under sim time (``/clock``
generated from the bag's log times, as the bag has no ``/clock``); the report's ``realtime``
section is checked against what the node says it did and against what was published. The
unit tests below check the latency arithmetic and the topic and node command-line mapping
without DDS.
"""

import json
import math

import pytest
from replay_helpers import CAMERA, CLASSES, GT_DETS, GT_MASK, SCALE, make_truth, write_bag

from mamba_perception.replay import cli, live, sample
from mamba_perception.replay.bag import BagReader

LIVE_FRAMES = 12  # consecutive frames: 1.1 s at the recorded 10 fps
# As the node tests: the network input is capped at 64 px (CPU forward in tens of ms).
TINY_POLICY = {'color_order': 'RGB', 'mean': [123.675, 116.28, 103.53],
               'std': [58.395, 57.12, 57.375], 'max_long_side_px': 64, 'max_short_side_px': 64,
               'allow_upscale': False, 'pad_multiple_px': 32}
QUICK_NODE = ['--node-param', 'warmup_size_px:=[64, 64]', '--node-param', 'warmup_iterations:=1',
              '--node-param', 'diagnostics.period_s:=0.5',
              '--node-param', 'diagnostics.expected_rate_hz:=0.0']


@pytest.fixture(scope='module')
def live_frames():
    return sample.read_frames(sample.find_sample_video(), LIVE_FRAMES, start=0, stride=1,
                              scale=SCALE)


@pytest.fixture(scope='module')
def live_bag(tmp_path_factory, live_frames):
    return write_bag(tmp_path_factory.mktemp('live') / 'bag', live_frames,
                     make_truth(live_frames), 'mcap')


@pytest.fixture(scope='module')
def tiny_bundle(tmp_path_factory):
    from mamba_perception.models.bundle import create_random_bundle
    path = tmp_path_factory.mktemp('bundles') / 'tiny.safetensors'
    create_random_bundle(path, class_names=CLASSES, input_policy=TINY_POLICY)
    return path


def _finite_positive_stats(stats, count):
    assert stats['count'] == count
    values = [stats[k] for k in ('p50_ms', 'p90_ms', 'p99_ms', 'max_ms')]
    assert all(math.isfinite(v) and v > 0 for v in values), stats
    assert values == sorted(values), stats


@pytest.mark.ros
def test_live_mode_against_a_real_node_process(tmp_path, ros_domain_id, monkeypatch, live_bag,
                                               live_frames, tiny_bundle, capsys):
    monkeypatch.setenv('ROS_DOMAIN_ID', str(ros_domain_id))
    monkeypatch.setenv('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')
    monkeypatch.delenv('ROS_LOCALHOST_ONLY', raising=False)
    runs = []
    real_score = live.score
    monkeypatch.setattr(live, 'score', lambda run, *a: runs.append(run) or real_score(run, *a))
    out = tmp_path / 'report'
    code = cli.main([str(live_bag), '--live', '--bundle', str(tiny_bundle), '--out', str(out),
                     '--gt-detections', GT_DETS, '--gt-masks', GT_MASK, '--no-progress',
                     '--device', 'cpu', *QUICK_NODE])
    printed = capsys.readouterr().out
    node_log = (out / 'node.log').read_text(errors='replace')
    assert code == cli.EXIT_OK, f'{printed}\n--- node log ---\n{node_log}'
    (run,) = runs

    r = json.loads((out / 'report.json').read_text())
    assert r['mode'] == 'live' and r['status'] == 'complete'
    assert list(r)[0] == 'WARNING' and r['scores_are_accuracy'] is False  # random bundle
    rt = r['realtime']
    assert rt['node']['started_here'] is True and rt['node']['exit_code'] == 0
    assert rt['node']['cameras'] == {CAMERA: 'camera'}
    assert rt['clock']['mode'] == 'sim time'
    assert rt['clock']['clock_published'].startswith('generated from the bag log times')

    published, received = rt['frames_published'], rt['outputs_received']
    assert published == LIVE_FRAMES
    assert 0 < received <= published
    assert rt['dropped_frames'] == published - received
    assert rt['drop_rate'] == pytest.approx((published - received) / published)
    node = rt['node_reported']
    assert node is not None, node_log
    assert node['baseline'] == 'zero (node started here)'
    assert node['frames_published'] == received  # every output the node published arrived
    assert node['frames_received'] <= published
    assert node['frames_received'] == (node['frames_published'] + node['frames_dropped']
                                       + node['bad_inputs'])
    assert node['frames_lost_before_node'] == published - node['frames_received']
    assert node['bad_inputs'] == 0

    _finite_positive_stats(rt['stamp_to_publish_latency_ms'], received)
    _finite_positive_stats(rt['input_to_output_latency_ms'], received)
    assert rt['stamp_to_publish_latency_ms']['max_ms'] < 10_000
    if received >= 2:
        assert 0 < rt['output_rate_hz'] < 1000
    assert rt['input_rate_hz'] == pytest.approx(10.0, rel=0.3)  # recorded 10 fps

    # outputs carry the input headers: every output stamp is one published, frame_id kept
    assert rt['outputs_with_unknown_stamp'] == 0 and rt['frame_id_mismatches'] == 0
    stamps = {sample.frame_stamp_ns(n) for n, _rgb in live_frames}
    assert {f.stamp_ns for f in run.sent.values()} == stamps
    for key, outputs in run.outputs.items():  # keyed by the stamp the outputs carried
        frame = run.sent[key]
        assert key[1] == frame.sent_stamp_ns == frame.stamp_ns  # sim time: recorded stamps
        assert live._stamp(outputs.detections) == frame.stamp_ns
        assert outputs.detections.header.frame_id == 'cam'
        assert outputs.mask_shape == (frame.height, frame.width) == live_frames[0][1].shape[:2]
        assert len(outputs.publish_ns) == 2  # detections and mask, each with its publish time

    # accuracy from the recorded outputs, paired with the bag's ground truth by stamp
    counts = r['counts']
    assert counts['frames'] == received
    assert counts['frames_with_box_truth'] == counts['frames_with_mask_truth'] == received
    assert r['detection'] is not None and r['segmentation'] is not None
    assert r['latency_ms'] is None and r['realtime_simulation'] is None

    md = (out / 'report.md').read_text()
    assert md.startswith('**WARNING: RANDOM-INITIALISED WEIGHTS')
    assert '## Real-time behaviour (live mode)' in md
    assert f'| frames published into the node | {published} |' in md
    assert (out / 'plots' / 'latency_cdf.png').stat().st_size > 1000
    assert f'live: {published} frames published, {received} with outputs' in printed


@pytest.mark.ros
@pytest.mark.slow
def test_live_mode_into_an_already_running_node(tmp_path, ros_domain_id, monkeypatch, live_bag,
                                                tiny_bundle, start_node):
    """A node started as av.launch.py starts it (namespace, remap, sim time), played twice."""
    monkeypatch.setenv('ROS_DOMAIN_ID', str(ros_domain_id))
    monkeypatch.setenv('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')
    monkeypatch.delenv('ROS_LOCALHOST_ONLY', raising=False)
    node = start_node('perception_node', '--ros-args', '-r', '__ns:=/perception',
                      '-p', f'bundle_path:={tiny_bundle}', '-p', 'device:=cpu',
                      '-p', 'precision:=fp32', '-p', 'use_sim_time:=true',
                      *[a for a in QUICK_NODE if a != '--node-param' for a in ('-p', a)],
                      '-r', f'camera/image:={CAMERA}')
    reports = []
    for i in range(2):
        out = tmp_path / f'r{i}'
        code = cli.main([str(live_bag), '--live', '--node-already-running', '--node-namespace',
                         'perception', '--out', str(out), '--topics', CAMERA,
                         '--gt-detections', GT_DETS,
                         '--no-progress', '--rate', '2', '--max-frames', '6'])
        assert code == cli.EXIT_OK, node.output()
        reports.append(json.loads((out / 'report.json').read_text()))
    for r in reports:
        rt = r['realtime']
        assert rt['node']['started_here'] is False and rt['node']['name'] == '/perception/' \
            'mamba_perception'
        assert rt['node']['use_sim_time'] is True and rt['node']['use_sim_time_asked'] is True
        assert rt['frames_published'] == 6 and 0 < rt['outputs_received'] <= 6
        nr = rt['node_reported']
        assert nr['baseline'] == 'last report before the first frame'
        assert nr['frames_published'] == rt['outputs_received']  # this run's frames only
        assert nr['frames_received'] == (nr['frames_published'] + nr['frames_dropped']
                                         + nr['bad_inputs']) <= 6
        _finite_positive_stats(rt['stamp_to_publish_latency_ms'], rt['outputs_received'])
        assert r['counts']['frames_with_box_truth'] == rt['outputs_received']
        assert r['status'] == 'complete' and list(r)[0] == 'WARNING'  # bundle read by its path
    assert node.proc.poll() is None  # still running: the command did not stop it


# -- without DDS ------------------------------------------------------------------------------

def _run(sim_time, rate=1.0):
    run = live.LiveRun(bag={'path': 'b', 'status': 'complete'}, cameras=[('/cam/image', 'cam')],
                       transport='raw', sim_time=sim_time, rate=rate, clock_source='test',
                       node={'name': '/mamba_perception', 'started_here': True})
    return run


def test_latency_uses_the_node_clock_interpolated_between_clock_messages():
    run = _run(sim_time=True, rate=2.0)
    t0, bag0 = 1_000 * live.NS, 50 * live.NS
    run.clock_history = [(t0, bag0), (t0 + 10_000_000, bag0 + 20_000_000)]  # 10 ms at x2
    frame = live.SentFrame('/cam/image', 'cam', 0, bag0, bag0, bag0, t0, 'f', 4, 4)
    run.sent[('cam', bag0)] = frame
    run.outputs[('cam', bag0)] = live.FrameOutputs(publish_ns=[t0 + 4_000_000, t0 + 5_000_000])
    samples = live.latency_samples(run)
    assert samples['stamp_to_publish_ms'] == [pytest.approx(10.0)]  # 5 ms wall at x2
    assert samples['input_to_output_ms'] == [pytest.approx(5.0)]
    assert run.node_clock_ns(t0 + 20_000_000) == bag0 + 40_000_000  # extrapolated at x2
    wall = _run(sim_time=False)
    assert wall.node_clock_ns(123) == 123


def test_realtime_summary_counts_drops_and_node_counters():
    run = _run(sim_time=False)
    for i in range(4):
        stamp = (10 + i) * live.NS
        run.sent[('cam', stamp)] = live.SentFrame('/cam/image', 'cam', i, stamp, stamp, stamp,
                                                  stamp, 'f', 4, 4)
        if i != 2:
            run.outputs[('cam', stamp)] = live.FrameOutputs(publish_ns=[stamp + 20_000_000])
    run.first_frame_wall_ns, run.last_frame_wall_ns = 10 * live.NS, 13 * live.NS
    values = {'frames received': '4', 'frames published': '3', 'frames dropped': '1',
              'bad inputs': '0', 'latency p50 (ms)': '20.0', 'latency p99 (ms)': 'n/a'}
    run.diagnostics['cam'] = [(14 * live.NS, values)]
    rt = live.realtime_summary(run)
    assert (rt['frames_published'], rt['outputs_received'], rt['dropped_frames']) == (4, 3, 1)
    assert rt['stamp_to_publish_latency_ms']['p50_ms'] == pytest.approx(20.0)
    assert rt['output_rate_hz'] == pytest.approx(2 / 3)
    assert rt['input_rate_hz'] == pytest.approx(1.0)
    nr = rt['node_reported']
    assert (nr['frames_received'], nr['frames_published'], nr['frames_dropped']) == (4, 3, 1)
    assert nr['frames_lost_before_node'] == 0
    assert nr['per_camera']['cam']['window_latency_ms'] == {'p50': 20.0, 'p99': None}
    assert rt['per_camera']['cam']['dropped_frames'] == 1


def test_topics_and_node_command_line(tmp_path):
    bag = tmp_path / 'sample'
    sample.build_sample_bag(bag, count=2)
    options = live.LiveOptions(namespace='perception')
    with BagReader(bag) as reader:
        cameras, transport = live.select_cameras(reader, (), (), options)
        assert (cameras, transport) == ([(sample.RAW_TOPIC, 'camera')], 'raw')
        compressed = live.select_cameras(reader, (), (), live.LiveOptions(
            input_transport='compressed', cameras=['front']))
        assert compressed == ([(sample.COMPRESSED_TOPIC, 'front')], 'compressed')
    argv = live.node_argv('/m.safetensors', cameras, transport, True, options, 'cpu', 'fp32',
                          ['warmup_iterations:=1'])
    assert argv[0].endswith('perception_node')
    text = ' '.join(argv)
    for part in ('-r __ns:=/perception', '-p bundle_path:=/m.safetensors',
                 '-p cameras:=[camera]', '-p input_transport:=raw', '-p use_sim_time:=true',
                 '-p device:=cpu', '-p warmup_iterations:=1',
                 f'-r camera/image:={sample.RAW_TOPIC}'):
        assert part in text
    assert live.camera_name_from_topic('/sensing/camera/front/image_raw/compressed', 0) == 'front'
    assert live.read_bundle_metadata(tmp_path / 'missing') is None
    with pytest.raises(Exception, match='rate must be > 0'):
        live.LiveOptions(rate=0)


def test_importing_replay_loads_no_rclpy():
    import subprocess
    import sys
    code = ('import sys, mamba_perception.replay.cli, mamba_perception.replay.live; '
            'print("rclpy" in sys.modules, "torch" in sys.modules)')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ['False', 'False']
