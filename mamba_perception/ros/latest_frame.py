"""Keep-latest frame buffers and the inference worker thread (no rclpy).

The subscription callback only calls :meth:`LatestFrames.put`, which never blocks for longer
than a lock held for a few assignments: it stores the message in its camera's single slot.
A frame still waiting there when a newer one of the same camera arrives is dropped and counted,
so there is never a backlog — the worker always sees the newest frame of each camera.

The worker thread (:class:`InferenceWorker`) waits until at least one slot is full, takes every
full slot at once (frames of cameras that arrived together run as one batch) and hands them to
the node's processing function, off the executor thread.
"""

import logging
import threading
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
    """A daemon thread: ``process(taken_frames)`` for each batch of newest frames until stopped.

    ``process`` must handle its own errors; an exception that escapes it is logged through
    ``on_crash`` (or ``logging``) and the loop goes on with the next frames.
    """

    def __init__(self, frames: LatestFrames, process: Callable[[dict], None],
                 on_crash: Optional[Callable[[BaseException], None]] = None,
                 name: str = 'mamba_perception_inference') -> None:
        self.frames = frames
        self._process = process
        self._on_crash = on_crash
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.batches = 0

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> bool:
        """Close the buffer and join; True when the thread ended within ``timeout_s``."""
        self.frames.close()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def _loop(self) -> None:
        while not self.frames.closed:
            taken = self.frames.take_all(timeout_s=0.5)
            if not taken or self.frames.closed:
                continue
            try:
                self._process(taken)
                self.batches += 1
            except Exception as exc:  # the worker must survive anything a frame can cause
                if self._on_crash is not None:
                    self._on_crash(exc)
                else:
                    log.exception('inference worker: unexpected error')
