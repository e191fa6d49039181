"""Health judgement: rates, percentiles, budgets, silent cameras, time going backwards."""

import numpy as np
import pytest

from mamba_perception.ros.diagnostics import (
    ERROR,
    NS,
    OK,
    WARN,
    Budgets,
    CameraHealth,
    Window,
    percentiles,
)

MS = 1_000_000
T0 = 1_700_000_000 * NS  # a realistic epoch time


def feed(health, start_ns, seconds, rate_hz, latency_ms, publish_every=1):
    """Frames at rate_hz for seconds; every publish_every-th is published latency_ms later."""
    period = int(NS / rate_hz)
    t = start_ns
    for i in range(int(seconds * rate_hz)):
        t = start_ns + i * period
        health.record_input(t)
        if i % publish_every == 0:
            health.record_output(t + int(latency_ms * MS), t,
                                 {'inference': 5.0, 'decode': 1.0, 'publish': 0.5})
        else:
            health.record_drop(t)
    return t + int(latency_ms * MS)


def values(report):
    return dict(report[2])


def test_window_and_percentiles():
    w = Window()
    for i in range(100):
        w.add(i * NS, float(i))
    w.prune(100 * NS, 10 * NS)
    assert len(w) == 10 and w.values()[0] == 90.0
    p50, p99 = percentiles(w.values())
    assert p50 == pytest.approx(94.5) and p99 == pytest.approx(98.91)
    assert all(v != v for v in percentiles(Window().values()))


def test_healthy_camera_is_ok_with_all_fields():
    health = CameraHealth('front', T0)
    now = feed(health, T0, 5.0, 30.0, 20.0)
    level, message, kv = health.report(now, Budgets())
    kv = dict(kv)
    assert level == OK, message
    assert float(kv['input rate (Hz)']) == pytest.approx(30.0, rel=0.05)
    assert float(kv['output rate (Hz)']) == pytest.approx(30.0, rel=0.05)
    assert float(kv['latency p50 (ms)']) == pytest.approx(20.0)
    assert float(kv['latency p99 (ms)']) == pytest.approx(20.0)
    assert kv['frames dropped'] == '0' and kv['bad inputs'] == '0'
    for stage in ('decode', 'preprocess', 'inference', 'postprocess', 'publish'):
        assert f'{stage} p50 (ms)' in kv and f'{stage} p99 (ms)' in kv
    assert float(kv['inference p99 (ms)']) == pytest.approx(5.0)
    assert kv['preprocess p50 (ms)'] == 'n/a'  # never reported


def test_slow_output_warns_and_counts_drops():
    health = CameraHealth('front', T0)
    now = feed(health, T0, 5.0, 30.0, 20.0, publish_every=3)
    level, message, kv = health.report(now, Budgets())
    assert level == WARN and 'output rate' in message
    assert int(dict(kv)['frames dropped']) == 100


def test_latency_budget_levels():
    health = CameraHealth('front', T0)
    now = feed(health, T0, 3.0, 30.0, 150.0)
    level, message, _ = health.report(now, Budgets(max_latency_ms=100.0))
    assert level == ERROR and 'p50' in message
    health = CameraHealth('front', T0)
    now = feed(health, T0, 3.0, 30.0, 20.0)
    health.record_output(now, now - 500 * MS, {})  # one slow frame among ~90
    health.record_output(now, now - 500 * MS, {})
    level, message, _ = health.report(now, Budgets(max_latency_ms=100.0))
    assert level == WARN and 'p99' in message


def test_silent_camera_is_error_and_no_false_alarm_before_window_fills():
    health = CameraHealth('front', T0)
    level, message, _ = health.report(T0 + NS // 2, Budgets())
    assert level == OK, message  # half a second after activation: not judged yet
    level, message, _ = health.report(T0 + 3 * NS, Budgets(silent_after_s=2.0))
    assert level == ERROR and 'no frame' in message
    now = feed(health, T0 + 3 * NS, 6.0, 30.0, 10.0)  # the 5 s window holds frames only
    assert health.report(now, Budgets())[0] == OK


def test_bad_inputs_warn_or_error():
    health = CameraHealth('front', T0)
    health.record_input(T0 + NS)
    health.record_error(T0 + NS, 'unsupported encoding')
    level, message, kv = health.report(T0 + NS, Budgets())
    assert level == ERROR and 'unsupported encoding' in message
    assert dict(kv)['last error'] == 'unsupported encoding'
    health.record_output(T0 + NS + 10 * MS, T0 + NS, {})
    level, _, _ = health.report(T0 + NS + 10 * MS, Budgets())
    assert level == WARN
    level, _, _ = health.report(T0 + 8 * NS, Budgets(silent_after_s=100.0, expected_rate_hz=0))
    assert level == OK  # the error left the window


def test_time_going_backwards_resets_the_window_without_alarms():
    """A bag loop under use_sim_time: the clock jumps back 60 s; no false rate/silence alarms."""
    health = CameraHealth('front', T0)
    now = feed(health, T0, 5.0, 30.0, 20.0)
    assert health.report(now, Budgets())[0] == OK
    back = T0 - 60 * NS
    level, message, kv = health.report(back, Budgets())
    assert level == OK, message
    kv = dict(kv)
    assert kv['time resets'] == '1'
    assert kv['latency p50 (ms)'] == 'n/a'
    assert int(kv['frames received']) == 150  # totals survive
    now = feed(health, back + 10 * MS, 5.0, 30.0, 20.0)
    level, message, kv = health.report(now, Budgets())
    assert level == OK, message
    assert float(dict(kv)['input rate (Hz)']) == pytest.approx(30.0, rel=0.05)


def test_sim_time_before_first_clock_is_not_judged():
    health = CameraHealth('front', 0)
    level, message, _ = health.report(0, Budgets())
    assert level == OK and 'clock' in message
    level, message, _ = health.report(50 * NS, Budgets())  # first /clock: the window starts
    assert level == OK, message
    feed(health, 50 * NS, 3.0, 30.0, 10.0)
    assert health.report(53 * NS, Budgets())[0] == OK


def arrivals(health, start_ns, seconds, rate_hz, keep, jitter=0.0, seed=0):
    """A camera at rate_hz whose frame i reaches the node iff keep(i, rng); returns the count.

    Stamps are the capture times (with up to ``jitter`` periods of noise), arrival 5 ms later.
    """
    rng = np.random.default_rng(seed)
    period = NS / rate_hz
    arrived = 0
    for i in range(int(seconds * rate_hz)):
        if not keep(i, rng):
            continue
        stamp = start_ns + int(i * period + rng.uniform(-jitter, jitter) * period)
        health.record_input(stamp + 5 * MS, stamp)
        arrived += 1
    return arrived


def test_frames_lost_before_the_node_are_estimated_from_stamp_gaps():
    # Random losses (best-effort DDS under load): about half the frames never arrive.
    health = CameraHealth('front', T0)
    sent = int(5.0 * 30)
    arrived = arrivals(health, T0, 5.0, 30.0, lambda i, rng: i == 0 or rng.random() < 0.5,
                       jitter=0.1)
    level, message, kv = health.report(T0 + 5 * NS, Budgets(window_s=10.0))
    lost = int(dict(kv)['frames lost before node in window (est.)'])
    # Between the first and the last arrival every missing frame is a gap (the tail after the
    # last arrival is not visible yet).
    assert abs(lost - (sent - arrived)) <= 3, (lost, sent, arrived)
    assert level == WARN and 'frames lost before the node' in message, message


def test_no_frames_lost_with_jitter_repeats_and_a_bag_loop():
    health = CameraHealth('front', T0)
    arrivals(health, T0, 5.0, 30.0, lambda i, rng: True, jitter=0.1)
    last = health._last_stamp_ns
    health.record_input(T0 + 5 * NS, last)  # the same frame again: not a gap
    level, message, kv = health.report(T0 + 5 * NS, Budgets(window_s=10.0))
    assert dict(kv)['frames lost before node in window (est.)'] == '0'
    assert 'lost before' not in message  # (the output rate warns: nothing was published)
    # A source that restarts its stamps (bag loop, not our clock) only loses one gap.
    health = CameraHealth('front', T0)
    arrivals(health, T0, 2.0, 30.0, lambda i, rng: True)
    for i in range(30):
        health.record_input(T0 + 2 * NS + i * NS // 30, T0 - 60 * NS + i * NS // 30)
    assert dict(health.report(T0 + 3 * NS, Budgets())[2])[
        'frames lost before node in window (est.)'] == '0'


def test_batch_size_mean_over_the_window():
    health = CameraHealth('front', T0)
    budgets = Budgets()
    assert values(health.report(T0 + NS, budgets))['batch size mean (frames)'] == 'n/a'
    for i, size in enumerate((4, 4, 2, 1)):  # a frame without a size (0) is not counted
        health.record_output(T0 + i * MS, T0, {}, size)
    health.record_output(T0 + 5 * MS, T0, {})
    assert values(health.report(T0 + NS, budgets))['batch size mean (frames)'] == '2.75'
    # outside the window they no longer count
    later = T0 + int((budgets.window_s + 2) * NS)
    health.record_output(later, later - MS, {}, 3)
    assert values(health.report(later, budgets))['batch size mean (frames)'] == '3.00'
