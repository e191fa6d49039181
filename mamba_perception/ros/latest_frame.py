"""Keep-latest frame buffers and the inference worker thread (no rclpy).

The subscription callback only calls :meth:`LatestFrames.put`, which never blocks for longer
than a lock held for a few assignments: it stores the message in its camera's single slot.
A frame still waiting there when a newer one of the same camera arrives is dropped and counted,
so there is never a backlog — the worker always sees the newest frame of each camera.

The worker thread (:class:`InferenceWorker`) waits until at least one slot is full, takes every
full slot at once (frames of cameras that arrived together run as one batch) and hands them to
the node's processing function, off the executor thread; with two stages a second thread
finishes each batch while the first starts the next.

With a batch window (``batch_window_s`` > 0) a take waits, after the first frame since the last
take arrived, up to the window for the other cameras' slots to fill. A worker faster than the
cameras otherwise takes one or two frames at a time whenever cameras are not phase-locked,
and a batch of four costs a GPU less than four batches of one; the price is at most the window
of added latency for the frame that came first. Only cameras heard from within ``silent_after_s``
are waited for: a camera that stopped (or never started) costs the window only until it counts
as silent, and a camera slower than the others costs it on the batches it has no frame for.
"""

import logging
import threading
import time
from typing import Any, Callable, Optional

log = logging.getLogger(__name__)


class LatestFrames:
    """One slot per camera; ``put`` replaces (and counts as dropped) an unprocessed frame."""

    def __init__(self, cameras, batch_window_s: float = 0.0, silent_after_s: float = 2.0) -> None:
        if not batch_window_s >= 0.0:
            raise ValueError(f'batch_window_s must be >= 0, got {batch_window_s!r}')
        if not silent_after_s > 0.0:
            raise ValueError(f'silent_after_s must be > 0, got {silent_after_s!r}')
        self._cond = threading.Condition()
        self._slots: dict = {camera: None for camera in cameras}
        self.dropped = {camera: 0 for camera in cameras}
        self.accepted = {camera: 0 for camera in cameras}
        self._closed = False
        self.batch_window_s = float(batch_window_s)
        self.silent_after_s = float(silent_after_s)
        self._first_put_s: Optional[float] = None  # monotonic time of the oldest waiting frame
        self._last_put_s: dict = {camera: None for camera in cameras}  # monotonic, per camera

    def put(self, camera: str, item: Any) -> bool:
        """Store ``item`` as ``camera``'s newest frame; True when it replaced an older one."""
        with self._cond:
            replaced = self._slots[camera] is not None
            if replaced:
                self.dropped[camera] += 1
            now = time.monotonic()
            if self._first_put_s is None:
                self._first_put_s = now
            self._last_put_s[camera] = now
            self._slots[camera] = item
            self.accepted[camera] += 1
            self._cond.notify()
        return replaced

    def take_all(self, timeout_s: Optional[float] = None) -> dict:
        """Wait until a slot is full (or closed / timeout); return and empty all full slots.

        With a batch window, wait further until the slot of every camera that is not silent
        is full or the window has passed since the oldest waiting frame arrived (not since this
        call).
        """
        with self._cond:
            self._cond.wait_for(lambda: self._closed or any(
                v is not None for v in self._slots.values()), timeout_s)
            if self.batch_window_s > 0 and self._first_put_s is not None:
                left = self._first_put_s + self.batch_window_s - time.monotonic()
                if left > 0:
                    self._cond.wait_for(lambda: self._closed or self._live_slots_full(), left)
            taken = {k: v for k, v in self._slots.items() if v is not None}
            for k in taken:
                self._slots[k] = None
            self._first_put_s = None
            return taken

    def _live_slots_full(self) -> bool:
        """Tell whether every camera heard from within ``silent_after_s`` has a waiting frame."""
        heard_since = time.monotonic() - self.silent_after_s
        return all(self._slots[camera] is not None for camera, last in self._last_put_s.items()
                   if last is not None and last >= heard_since)

    def clear(self) -> int:
        """Drop every waiting frame (counted as dropped); return how many."""
        with self._cond:
            n = 0
            for k, v in self._slots.items():
                if v is not None:
                    self.dropped[k] += 1
                    self._slots[k] = None
                    n += 1
            self._first_put_s = None
            return n

    def close(self) -> None:
        """Wake every waiter; later ``take_all`` calls return at once."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed


class InferenceWorker:
    """Daemon thread(s) running ``process(taken_frames)`` on each batch of newest frames.

    One stage (``finish`` None): one thread takes the full slots and calls ``process``.

    Two stages (``finish`` given): the first thread calls ``process(taken)``, which starts the
    work and returns a handle (or None when there is nothing to finish); a second thread calls
    ``finish(handle)``. The first stage of the next frames then overlaps the second stage of
    these (for the node: the next batch's forward on the GPU while this batch's detection and
    publishing run on the host). At most one handle waits between the stages and the first
    thread takes new frames only when the second is free to take its handle, so frames wait
    in the one-slot buffers (where newer ones replace them) rather than in a queue: never more
    than two batches are in flight, and none is stale by more than one batch.

    ``process`` / ``finish`` must handle their own errors; an exception that escapes them is
    logged through ``on_crash`` (or ``logging``) and the loop goes on with the next frames.
    """

    def __init__(self, frames: LatestFrames, process: Callable[[dict], Any],
                 on_crash: Optional[Callable[[BaseException], None]] = None,
                 name: str = 'mamba_perception_inference',
                 finish: Optional[Callable[[Any], None]] = None) -> None:
        self.frames = frames
        self._process = process
        self._finish = finish
        self._on_crash = on_crash
        self._threads = [threading.Thread(target=self._loop, name=name, daemon=True)]
        if finish is not None:
            self._threads.append(threading.Thread(target=self._finish_loop,
                                                  name=f'{name}_finish', daemon=True))
        self._handoff: Optional[Any] = None  # the handle waiting for the second stage
        self._handoff_cond = threading.Condition()
        self._stopped = False
        self.batches = 0

    def start(self) -> None:
        """Start the thread(s)."""
        for thread in self._threads:
            thread.start()

    def stop(self, timeout_s: float = 30.0) -> bool:
        """Close the buffer and join; True when the threads ended within ``timeout_s``.

        A handle already between the stages is still finished (its results published).
        """
        self.frames.close()
        with self._handoff_cond:
            self._stopped = True
            self._handoff_cond.notify_all()
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            if thread.is_alive() and threading.current_thread() is not thread:
                thread.join(max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in self._threads)

    def _crashed(self, exc: BaseException) -> None:
        if self._on_crash is not None:
            self._on_crash(exc)
        else:
            log.exception('inference worker: unexpected error')

    def _loop(self) -> None:
        while not self.frames.closed:
            if self._finish is not None:
                with self._handoff_cond:  # the second stage has taken the last handle
                    self._handoff_cond.wait_for(lambda: self._handoff is None or self._stopped)
                    if self._stopped:
                        return
            taken = self.frames.take_all(timeout_s=0.5)
            if not taken or self.frames.closed:
                continue
            try:
                handle = self._process(taken)
            except Exception as exc:  # the worker must survive anything a frame can cause
                self._crashed(exc)
                continue
            if self._finish is None:
                self.batches += 1
            elif handle is not None:
                with self._handoff_cond:
                    self._handoff = handle
                    self._handoff_cond.notify_all()

    def _finish_loop(self) -> None:
        while True:
            with self._handoff_cond:
                self._handoff_cond.wait_for(lambda: self._handoff is not None or self._stopped)
                handle, self._handoff = self._handoff, None
                self._handoff_cond.notify_all()  # taken: the first stage may start the next
                if handle is None:  # stopped with nothing left to finish
                    return
            try:
                self._finish(handle)
                self.batches += 1
            except Exception as exc:
                self._crashed(exc)
