"""The transport between a training worker and its checkpoint actor.

What crosses is one byte buffer per save and a JSON string
(:func:`raybranch.checkpoint.training_state.to_buffer`): no torch object is pickled, and the
actor reads every tensor back as a zero-copy view of the buffer in the object store.

    training thread: collect + copy into a reused buffer ─▶ outbox
    sender thread:   every batch queued by now → one ray.put + one actor call (save_many)

The training thread pays for the copy; ``ray.put`` and the call run on the sender thread, and the
saves that queue up while it is busy go out together in one call, so Ray's fixed cost per call
is shared when saves come fast.
"""
from __future__ import annotations

import queue
import threading
from collections import deque

import ray
import torch


class Ticket:
    """One save on its way: packed on the training thread, sent by the sender thread."""

    __slots__ = ("step", "sent", "ref", "index", "error")

    def __init__(self, step: int):
        self.step = step
        self.sent = threading.Event()
        self.ref = None  # the ObjectRef of the actor call that carries it, once sent
        self.index = 0  # its place in that call's batch
        self.error: BaseException | None = None  # ray.put / submission failed


class Sender:
    """Sends batches of packed saves to ``actor.save_many`` on its own thread; reuses buffers."""

    def __init__(self, actor, name: str, max_buffers: int):
        self.actor, self.name = actor, name
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._free: deque[torch.Tensor] = deque(maxlen=max_buffers)  # buffers the sender is done with
        self._thread: threading.Thread | None = None

    def alloc(self, n: int, pinned: bool) -> torch.Tensor:
        """A free packing buffer of ``n`` bytes (reused: no fresh pages to fault in or pin every step)."""
        try:
            buf = self._free.pop()
        except IndexError:
            buf = None
        if buf is None or buf.numel() != n or buf.is_pinned() != pinned:
            buf = torch.empty(n, dtype=torch.uint8, pin_memory=pinned)
        return buf

    def post(self, batch: list) -> None:
        """Queue a batch of (ticket, buffer, cuda event | None, doc, slices, tags, snapshot)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
            self._thread.start()
        self._outbox.put(batch)

    def stop(self) -> None:
        if self._thread is not None:
            self._outbox.put(None)
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        while True:
            batches = [self._outbox.get()]
            while batches[-1] is not None:
                try:
                    batches.append(self._outbox.get_nowait())
                except queue.Empty:
                    break
            stop = batches[-1] is None
            batch = [item for b in batches if b is not None for item in b]
            if batch:
                self._send(batch)
            if stop:
                return

    def _send(self, batch: list) -> None:
        tickets = [item[0] for item in batch]
        try:
            for _, _, copied, *_ in batch:
                if copied is not None:
                    copied.synchronize()
            ref = ray.put([item[1].numpy() for item in batch])  # one copy into the object store
            self._free.extend(item[1] for item in batch)
            call = self.actor.save_many.remote(ref, [(t.step, *item[3:]) for t, item in zip(tickets, batch)])
            for i, t in enumerate(tickets):
                t.ref, t.index = call, i
        except BaseException as exc:  # noqa: BLE001 - handed to the training thread
            for t in tickets:
                t.error = exc
        finally:
            del batch
            for t in tickets:
                t.sent.set()


__all__ = ["Sender", "Ticket"]
