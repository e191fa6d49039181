"""Keep-latest frame buffers and the inference worker thread (no rclpy).

The subscription callback only calls :meth:`LatestFrames.put`, which never blocks for longer
than a lock held for a few assignments: it stores the message in its camera's single slot.
A frame still waiting there when a newer one of the same camera arrives is dropped and counted,
so there is never a backlog — the worker always sees the newest frame of each camera.

The worker thread (:class:`InferenceWorker`) waits until at least one slot is full, takes every
full slot at once (frames of cameras that arrived together run as one batch) and hands them to
the node's processing function, off the executor thread; with two stages a second thread
finishes each batch while the first starts the next.
"""

import logging
import threading
import time
from typing import Any, Callable, Optional

log = logging.getLogger(__name__)


class LatestFrames:
    """One slot per camera; ``put`` replaces (and counts as dropped) an unprocessed frame."""

    def __init__(self, cameras) -> None:
        self._cond = threading.Condition()
        self._slots: dict = {camera: None for camera in cameras}
        self.dropped = {camera: 0 for camera in cameras}
        self.accepted = {camera: 0 for camera in cameras}
        self._closed = False

    def put(self, camera: str, item: Any) -> bool:
        """Store ``item`` as ``camera``'s newest frame; True when it replaced an older one."""
        with self._cond:
            replaced = self._slots[camera] is not None
            if replaced:
                self.dropped[camera] += 1
            self._slots[camera] = item
            self.accepted[camera] += 1
            self._cond.notify()
        return replaced

    def take_all(self, timeout_s: Optional[float] = None) -> dict:
        """Wait until a slot is full (or closed / timeout); return and empty all full slots."""
        with self._cond:
            self._cond.wait_for(lambda: self._closed or any(
                v is not None for v in self._slots.values()), timeout_s)
            taken = {k: v for k, v in self._slots.items() if v is not None}
            for k in taken:
                self._slots[k] = None
            return taken

    def clear(self) -> int:
        """Drop every waiting frame (counted as dropped); return how many."""
        with self._cond:
            n = 0
            for k, v in self._slots.items():
                if v is not None:
                    self.dropped[k] += 1
                    self._slots[k] = None
                    n += 1
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

    Three stages (``publish`` given too): ``finish(handle)`` returns a second handle (or None)
    that a third thread passes to ``publish``, with the same one-slot handoff: the node
    publishes one batch while the next is being finished. Never more than three batches are
    in flight.

    ``process`` / ``finish`` / ``publish`` must handle their own errors; an exception that
    escapes them is logged through ``on_crash`` (or ``logging``) and the loop goes on with the
    next frames.
    """

    def __init__(self, frames: LatestFrames, process: Callable[[dict], Any],
                 on_crash: Optional[Callable[[BaseException], None]] = None,
                 name: str = 'mamba_perception_inference',
                 finish: Optional[Callable[[Any], Any]] = None,
                 publish: Optional[Callable[[Any], None]] = None) -> None:
        if publish is not None and finish is None:
            raise ValueError('InferenceWorker: a publish stage needs a finish stage before it')
        self.frames = frames
        self._process = process
        self._later = [stage for stage in (finish, publish) if stage is not None]
        self._on_crash = on_crash
        self._threads = [threading.Thread(target=self._loop, name=name, daemon=True)]
        for j, suffix in enumerate(('finish', 'publish')[:len(self._later)]):
            self._threads.append(threading.Thread(target=self._stage_loop, args=(j,),
                                                  name=f'{name}_{suffix}', daemon=True))
        # slot j: the handle waiting for later stage j; feeder_done[j]: its feeder has ended
        self._slots: list = [None] * len(self._later)
        self._feeder_done = [False] * len(self._later)
        self._cond = threading.Condition()
        self._stopped = False
        self.batches = 0

    def start(self) -> None:
        """Start the thread(s)."""
        for thread in self._threads:
            thread.start()

    def stop(self, timeout_s: float = 30.0) -> bool:
        """Close the buffer and join; True when the threads ended within ``timeout_s``.

        Handles already past the first stage are still finished (their results published).
        """
        self.frames.close()
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
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

    def _hand_over(self, j: int, handle: Any) -> None:
        """Put ``handle`` in slot j (empty: its feeder waited for that before starting)."""
        with self._cond:
            self._slots[j] = handle
            self._cond.notify_all()

    def _feeder_ended(self, j: int) -> None:
        if j < len(self._slots):
            with self._cond:
                self._feeder_done[j] = True
                self._cond.notify_all()

    def _loop(self) -> None:
        try:
            while not self.frames.closed:
                if self._later:
                    with self._cond:  # the second stage has taken the last handle
                        self._cond.wait_for(lambda: self._slots[0] is None or self._stopped)
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
                if not self._later:
                    self.batches += 1
                elif handle is not None:
                    self._hand_over(0, handle)
        finally:
            self._feeder_ended(0)

    def _stage_loop(self, j: int) -> None:
        last = j == len(self._later) - 1
        try:
            while True:
                with self._cond:
                    # as the first stage: start only when the next stage can take the result
                    self._cond.wait_for(lambda: (self._slots[j] is not None
                                                 or self._feeder_done[j])
                                        and (last or self._slots[j + 1] is None))
                    handle, self._slots[j] = self._slots[j], None
                    self._cond.notify_all()  # taken: the stage before may hand over the next
                if handle is None:  # the stage before has ended and nothing is left
                    return
                try:
                    out = self._later[j](handle)
                except Exception as exc:
                    self._crashed(exc)
                    continue
                if last:
                    self.batches += 1
                elif out is not None:
                    self._hand_over(j + 1, out)
        finally:
            self._feeder_ended(j + 1)
