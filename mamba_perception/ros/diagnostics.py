"""Per-camera health: rolling windows, p50/p99, OK/WARN/ERROR against budgets (no rclpy).

Every time is int nanoseconds on the **node clock** (``node.get_clock().now()``), which follows
``/clock`` under ``use_sim_time``; the node passes it in, so this module never reads a clock of
its own (the pitfall of diagnostic_updater's Python tasks). When that time goes backwards (a
bag loops, a simulator resets) the windows are emptied and the checks restart as after
activation: no false alarms, no negative rates. While the time is 0 (sim time before the first
``/clock``) nothing is judged.

Levels match ``diagnostic_msgs/DiagnosticStatus``: OK 0, WARN 1, ERROR 2.
"""

from collections import deque
from dataclasses import dataclass
from typing import Optional

import numpy as np

OK, WARN, ERROR = 0, 1, 2
# Per-frame times in the order a frame meets them. 'queued': from the subscription callback
# until the worker took the frame from its one-slot buffer; 'handoff': from the end of the
# worker's first stage (decode + the dense forward queued) until the second stage took the batch
# (0 in one stage). Both are waits, not work: with the others they show where a frame's
# stamp-to-publish latency goes.
STAGES = ('queued', 'decode', 'preprocess', 'handoff', 'inference', 'postprocess', 'publish')
NS = 1_000_000_000


@dataclass
class Budgets:
    """What the operator expects; see the ``diagnostics.*`` parameters."""

    window_s: float = 5.0
    expected_rate_hz: float = 30.0
    rate_tolerance: float = 0.2
    max_latency_ms: float = 100.0
    silent_after_s: float = 2.0


class Window:
    """``(time_ns, value)`` pairs younger than the window."""

    def __init__(self) -> None:
        self._items: deque = deque()

    def add(self, t_ns: int, value: float = 1.0) -> None:
        """Append one sample."""
        self._items.append((t_ns, value))

    def prune(self, now_ns: int, window_ns: int) -> None:
        """Forget samples older than ``now_ns - window_ns``."""
        items = self._items
        while items and items[0][0] < now_ns - window_ns:
            items.popleft()

    def clear(self) -> None:
        """Forget everything."""
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)

    def total(self) -> float:
        """Sum of the values."""
        return float(sum(v for _, v in self._items))

    def values(self) -> np.ndarray:
        """Return the values, oldest first."""
        return np.fromiter((v for _, v in self._items), np.float64, len(self._items))


def percentiles(values: np.ndarray) -> tuple:
    """(p50, p99) of ``values``; (nan, nan) when empty."""
    if values.size == 0:
        return float('nan'), float('nan')
    p50, p99 = np.percentile(values, (50, 99))
    return float(p50), float(p99)


def _fmt(value: float, digits: int = 2) -> str:
    return 'n/a' if value != value else f'{value:.{digits}f}'  # NaN check without math


class CameraHealth:
    """Counters and windows of one camera, judged against :class:`Budgets` by :meth:`report`."""

    def __init__(self, name: str, start_ns: int) -> None:
        self.name = name
        self.frames_received = 0
        self.frames_published = 0
        self.frames_dropped = 0
        self.bad_inputs = 0
        self.overlays_published = 0
        self.time_resets = 0
        self.last_error = ''
        self._inputs = Window()
        self._outputs = Window()
        self._drops = Window()
        self._errors = Window()
        self._latency = Window()
        self._stamp_gaps = Window()  # ns between consecutive source stamps, at arrival time
        self._batch_sizes = Window()  # frames in the batch each published frame ran in
        self._stages = {stage: Window() for stage in STAGES}
        self._restart(start_ns)

    def _windows(self):
        return (self._inputs, self._outputs, self._drops, self._errors, self._latency,
                self._stamp_gaps, self._batch_sizes, *self._stages.values())

    def _restart(self, now_ns: int) -> None:
        for window in self._windows():
            window.clear()
        self._start_ns = now_ns
        self._last_now_ns = now_ns
        self._last_input_ns: Optional[int] = None
        self._last_stamp_ns: Optional[int] = None

    def restart(self, now_ns: int) -> None:
        """Begin judging afresh from ``now_ns`` (activation); counters are kept."""
        self._restart(now_ns)

    def _tick(self, now_ns: int) -> None:
        if now_ns < self._last_now_ns:
            self.time_resets += 1
            self._restart(now_ns)
        elif self._start_ns == 0 and now_ns > 0:
            self._start_ns = now_ns  # first /clock message under use_sim_time
        self._last_now_ns = now_ns

    def record_input(self, now_ns: int, stamp_ns: int = 0) -> None:
        """Count a frame arriving (callback time) with its header stamp (0: unknown)."""
        self._tick(now_ns)
        self.frames_received += 1
        self._inputs.add(now_ns)
        self._last_input_ns = now_ns
        last = self._last_stamp_ns
        if stamp_ns > 0 and stamp_ns != last:  # a repeated stamp is no gap
            if last is not None and stamp_ns > last:
                self._stamp_gaps.add(now_ns, float(stamp_ns - last))
            self._last_stamp_ns = stamp_ns  # backwards: the source restarted (bag loop)

    def _lost_before_node(self) -> int:
        """Frames missing between the stamps that arrived in the window (an estimate).

        ROS 2 headers carry no sequence number, so the camera period is estimated from the
        stamp gaps: the median of the gaps below 1.5x their 10th percentile (the one-period
        gaps, as long as a tenth of consecutive frames arrive; stamp jitter up to ~10 % of a
        period). A gap of k periods means k - 1 frames that never reached the callback:
        dropped by DDS (best-effort QoS, transport limits) or by the driver. A source that
        loses the same share of every period looks like a slower camera and is not counted.
        """
        gaps = self._stamp_gaps.values()
        if len(gaps) < 5:
            return 0
        low = float(np.percentile(gaps, 10))
        period = float(np.median(gaps[gaps < 1.5 * low]))
        if period <= 0:
            return 0
        return int(np.maximum(np.rint(gaps / period) - 1, 0).sum())

    def record_drop(self, now_ns: int, count: int = 1) -> None:
        """Frames replaced in the one-slot buffer before they were processed."""
        self._tick(now_ns)
        self.frames_dropped += count
        self._drops.add(now_ns, count)

    def record_error(self, now_ns: int, message: str) -> None:
        """Count a frame that could not be processed (bad input or output, out of memory)."""
        self._tick(now_ns)
        self.bad_inputs += 1
        self.last_error = message
        self._errors.add(now_ns)

    def record_output(self, now_ns: int, stamp_ns: int, stage_ms: dict,
                      batch_size: int = 0) -> None:
        """Count one frame's outputs published at ``now_ns``; ``stage_ms`` by stage name.

        ``batch_size``: frames of the batch this frame ran in (0: not known).
        """
        self._tick(now_ns)
        self.frames_published += 1
        self._outputs.add(now_ns)
        if batch_size > 0:
            self._batch_sizes.add(now_ns, float(batch_size))
        if now_ns > 0 and stamp_ns > 0:
            self._latency.add(now_ns, (now_ns - stamp_ns) / 1e6)
        for stage, ms in stage_ms.items():
            if stage in self._stages:
                self._stages[stage].add(now_ns, float(ms))

    def report(self, now_ns: int, budgets: Budgets) -> tuple:
        """``(level, message, [(key, value string), ...])`` at ``now_ns``."""
        self._tick(now_ns)
        window_ns = int(budgets.window_s * NS)
        for window in self._windows():
            window.prune(now_ns, window_ns)
        observed_s = min(budgets.window_s, max(0.0, (now_ns - self._start_ns) / NS))
        in_rate = len(self._inputs) / observed_s if observed_s > 0 else float('nan')
        out_rate = len(self._outputs) / observed_s if observed_s > 0 else float('nan')
        p50, p99 = percentiles(self._latency.values())
        lost = self._lost_before_node()
        sizes = self._batch_sizes.values()
        batch_mean = float(sizes.mean()) if sizes.size else float('nan')
        values = [
            ('input rate (Hz)', _fmt(in_rate)), ('output rate (Hz)', _fmt(out_rate)),
            ('latency p50 (ms)', _fmt(p50)), ('latency p99 (ms)', _fmt(p99)),
            ('frames received', str(self.frames_received)),
            ('frames published', str(self.frames_published)),
            ('frames dropped', str(self.frames_dropped)),
            ('frames dropped in window', str(int(self._drops.total()))),
            ('frames lost before node in window (est.)', str(lost)),
            # with several cameras: below their count, frames ran in smaller batches (see the
            # batch_window_ms parameter)
            ('batch size mean (frames)', _fmt(batch_mean)),
            ('bad inputs', str(self.bad_inputs)),
            ('overlays published', str(self.overlays_published)),
            ('bad inputs in window', str(len(self._errors))),
            ('last error', self.last_error),
        ]
        for stage, window in self._stages.items():
            s50, s99 = percentiles(window.values())
            values += [(f'{stage} p50 (ms)', _fmt(s50, 3)), (f'{stage} p99 (ms)', _fmt(s99, 3))]
        values += [('window (s)', _fmt(observed_s)), ('time resets', str(self.time_resets)),
                   ('latency budget (ms)', f'{budgets.max_latency_ms:g}'),
                   ('expected rate (Hz)', f'{budgets.expected_rate_hz:g}')]
        if now_ns == 0:
            return OK, 'waiting for the clock (use_sim_time without /clock yet)', values

        problems = []  # (level, text)
        since_input_s = (now_ns - (self._last_input_ns if self._last_input_ns is not None
                                   else self._start_ns)) / NS
        if since_input_s > budgets.silent_after_s:
            problems.append((ERROR, f'no frame for {since_input_s:.1f} s'))
        if len(self._errors):
            level = ERROR if not len(self._outputs) else WARN
            problems.append((level, f'{len(self._errors)} bad frame(s): {self.last_error}'))
        warmed_up = observed_s >= min(budgets.window_s, 2.0)
        minimum = budgets.expected_rate_hz * (1.0 - budgets.rate_tolerance)
        if budgets.expected_rate_hz > 0 and warmed_up and since_input_s <= budgets.silent_after_s:
            if in_rate < minimum:
                cause = (f' (~{lost} frames lost before the node: check the input QoS and '
                         'the DDS transport)' if lost else '')
                problems.append((WARN, f'input rate {in_rate:.1f} Hz < {minimum:.1f} Hz{cause}'))
            elif out_rate < minimum:
                problems.append((WARN, f'output rate {out_rate:.1f} Hz < {minimum:.1f} Hz '
                                       f'({int(self._drops.total())} frames dropped)'))
        if p50 > budgets.max_latency_ms:
            problems.append((ERROR, f'latency p50 {p50:.1f} ms > {budgets.max_latency_ms:g} ms'))
        elif p99 > budgets.max_latency_ms:
            problems.append((WARN, f'latency p99 {p99:.1f} ms > {budgets.max_latency_ms:g} ms'))
        if not problems:
            return OK, 'ok', values
        level = max(level for level, _ in problems)
        return level, '; '.join(text for _, text in problems), values
