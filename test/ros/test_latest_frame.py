"""Keep-latest buffer and worker: drops counted, newest frame served, no backlog."""

import threading
import time

import pytest

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


def heard_from(frames, camera):
    """``frames`` after one frame of ``camera`` (taken): the batch window waits for it."""
    frames.put(camera, None)
    frames.clear()
    return frames


def test_batch_window_waits_for_the_other_cameras():
    def take_with_left_arriving_late(frames):
        frames.put('front', 1)
        threading.Timer(0.1, frames.put, ('left', 'a')).start()
        started = time.monotonic()
        return frames.take_all(5.0), time.monotonic() - started

    # without a window the worker takes the first frame alone ...
    taken, _ = take_with_left_arriving_late(LatestFrames(['front', 'left']))
    assert taken == {'front': 1}
    # ... with one, both as one batch, as soon as every slot is full (not at the window's end)
    taken, waited = take_with_left_arriving_late(
        heard_from(LatestFrames(['front', 'left'], batch_window_s=3.0), 'left'))
    assert taken == {'front': 1, 'left': 'a'}
    assert waited < 2.0


def test_batch_window_is_bounded_and_counts_from_the_oldest_frame():
    frames = heard_from(LatestFrames(['front', 'left'], batch_window_s=0.5), 'left')
    frames.put('front', 1)
    started = time.monotonic()
    assert frames.take_all(5.0) == {'front': 1}  # no frame from left: the window ends the wait
    assert 0.4 < time.monotonic() - started < 3.0
    frames.put('front', 2)
    time.sleep(0.6)  # this frame has waited longer than the window already: no further wait
    started = time.monotonic()
    assert frames.take_all(5.0) == {'front': 2}
    assert time.monotonic() - started < 0.25
    # close() ends a wait inside the window too
    frames.put('front', 3)
    threading.Timer(0.1, frames.close).start()
    started = time.monotonic()
    frames.take_all(5.0)
    assert time.monotonic() - started < 0.4
    with pytest.raises(ValueError, match='batch_window_s'):
        LatestFrames(['front'], batch_window_s=-1.0)


def test_batch_window_does_not_wait_for_silent_cameras():
    def waited_for_front(frames):
        frames.put('front', 'f')
        started = time.monotonic()
        assert frames.take_all(5.0) == {'front': 'f'}
        return time.monotonic() - started

    frames = LatestFrames(['front', 'left', 'rear'], batch_window_s=0.3, silent_after_s=1.0)
    # 'left' and 'rear' never sent a frame: nothing to wait for
    assert waited_for_front(frames) < 0.2
    # 'left' was heard from just now: the window waits for it
    frames.put('left', 'l')
    frames.clear()
    assert 0.25 < waited_for_front(frames) < 3.0
    # 'left' has been silent for longer than silent_after_s: no wait again
    time.sleep(1.0)
    assert waited_for_front(frames) < 0.2
    with pytest.raises(ValueError, match='silent_after_s'):
        LatestFrames(['front'], silent_after_s=0.0)


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


class _Stages:
    """Timed stage functions for a worker: each records (stage, handle, start, end), and the
    batches between the first stage's start and the last stage's end are counted."""

    def __init__(self):
        self.lock = threading.Lock()
        self.events = []
        self.in_flight = self.max_in_flight = 0

    def first(self, sleep_s):
        def process(taken):
            with self.lock:
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
            return self.stage('process', taken['cam'], sleep_s, taken['cam'], last=False)
        return process

    def stage(self, name, handle, sleep_s, out, last):
        start = time.monotonic()
        time.sleep(sleep_s)
        with self.lock:
            self.events.append((name, handle, start, time.monotonic()))
            if last:
                self.in_flight -= 1
        return out

    def handles(self, name):
        return [e[1] for e in self.events if e[0] == name]

    def spans(self, name):
        return {e[1]: (e[2], e[3]) for e in self.events if e[0] == name}


def test_two_stages_overlap_and_keep_no_backlog():
    """The next batch's first stage runs while this batch finishes; at most two batches are
    in flight; under a flood only the newest frames are served, in order."""
    frames = LatestFrames(['cam'])
    stages = _Stages()
    worker = InferenceWorker(frames, stages.first(0.02),
                             finish=lambda h: stages.stage('finish', h, 0.05, None, last=True))
    worker.start()
    for i in range(200):  # ~10x faster than the finishing stage
        frames.put('cam', i)
        time.sleep(0.005)
    time.sleep(0.3)
    assert worker.stop(5.0)
    processed, finished = stages.handles('process'), stages.handles('finish')
    assert finished == processed  # every started batch finished, in order
    assert finished[-1] == 199 and finished == sorted(finished)
    assert len(finished) + frames.dropped['cam'] == 200
    assert stages.max_in_flight == 2  # one finishing, one started behind it; never more
    assert worker.batches == len(finished)
    # overlap: some batch's first stage started while the previous batch was finishing
    starts, spans = stages.spans('process'), stages.spans('finish')
    assert any(spans[a][0] < starts[b][0] < spans[a][1]
               for a, b in zip(finished[:-1], finished[1:], strict=True))


def test_two_stages_survive_exceptions_in_either_stage():
    frames = LatestFrames(['cam'])
    crashes, finished = [], []
    done = threading.Event()

    def process(taken):
        if taken['cam'] == 'bad_start':
            raise RuntimeError('start failed')
        return None if taken['cam'] == 'skip' else taken['cam']

    def finish(handle):
        if handle == 'bad_finish':
            raise RuntimeError('finish failed')
        finished.append(handle)
        done.set()

    worker = InferenceWorker(frames, process, crashes.append, finish=finish)
    worker.start()
    for item in ('bad_start', 'skip', 'bad_finish'):
        frames.put('cam', item)
        time.sleep(0.1)
    frames.put('cam', 'good')
    assert done.wait(5.0)
    assert worker.stop(5.0)
    assert finished == ['good']
    assert [str(c) for c in crashes] == ['start failed', 'finish failed']
