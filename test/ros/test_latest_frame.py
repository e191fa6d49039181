"""Keep-latest buffer and worker: drops counted, newest frame served, no backlog."""

import threading
import time

from mamba_perception.ros.latest_frame import InferenceWorker, LatestFrames


def test_put_replaces_and_counts_drops():
    frames = LatestFrames(['front', 'left'])
    assert frames.put('front', 1) is False
    assert frames.put('front', 2) is True
    assert frames.put('left', 'a') is False
    assert frames.take_all(0) == {'front': 2, 'left': 'a'}
    assert frames.dropped == {'front': 1, 'left': 0}
    assert frames.take_all(0.01) == {}
    frames.put('front', 3)
    assert frames.clear() == 1 and frames.dropped['front'] == 2


def test_worker_serves_newest_frames_only_under_a_flood():
    frames = LatestFrames(['cam'])
    served = []

    def slow(taken):
        served.append(taken['cam'])
        time.sleep(0.05)

    worker = InferenceWorker(frames, slow)
    worker.start()
    for i in range(200):  # 10x faster than the worker
        frames.put('cam', i)
        time.sleep(0.005)
    time.sleep(0.2)
    assert worker.stop(5.0)
    assert served[-1] == 199  # the last frame is processed, nothing queued behind it
    assert served == sorted(served)
    assert len(served) + frames.dropped['cam'] == 200
    assert frames.dropped['cam'] > 100


def test_worker_survives_exceptions():
    frames = LatestFrames(['cam'])
    seen, crashes = [], []
    done = threading.Event()

    def process(taken):
        seen.append(taken['cam'])
        if taken['cam'] == 'bad':
            raise RuntimeError('boom')
        done.set()

    worker = InferenceWorker(frames, process, crashes.append)
    worker.start()
    frames.put('cam', 'bad')
    time.sleep(0.1)
    frames.put('cam', 'good')
    assert done.wait(5.0)
    assert worker.stop(5.0)
    assert seen == ['bad', 'good'] and [str(c) for c in crashes] == ['boom']
