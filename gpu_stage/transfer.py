"""Host <-> device copies of the GPU stage that never stall its compute thread.

* host -> device: the source is pinned first, so the copy is asynchronous (a pageable source makes
  the copy wait for the device);
* device -> host (the gradient to the CPU stage): copied on a side stream into pinned memory and
  ordered by events: the copy waits for the backward that produced the gradient, the sender thread
  waits for the copy's event, and nothing waits for the whole device. A copy on the default stream
  would instead sit behind the next micro-batch's forward kernels.

On CPU every function is the identity (or a direct send), so the CPU path stays bit-identical.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

import torch

from redheart.stage.errors import ErrorKind, StageError


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on ``device``; asynchronous on CUDA (pinned staging), the tensor itself on CPU."""
    if device.type != "cuda":
        return tensor.to(device)
    if tensor.device.type == "cpu" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


class DeviceToHostSender:
    """Sends device tensors over a PeerLink from its own thread, each once its copy to host is done.

    Order is kept (one FIFO); ``drain`` blocks until every queued tensor was handed to the link,
    and must run before the link's own ``flush`` (which only knows what was handed to it)."""

    _instances: dict[str, DeviceToHostSender] = {}
    _instances_lock = threading.Lock()

    @classmethod
    def for_device(cls, device: torch.device) -> DeviceToHostSender:
        """One sender (thread and copy stream) per device and process: the stage part is rebuilt
        at every new run, its sender is not."""
        with cls._instances_lock:
            key = str(device)
            if key not in cls._instances:
                cls._instances[key] = cls(device)
            return cls._instances[key]

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self._queue: queue.Queue = queue.Queue()
        self._cond = threading.Condition()
        self._pending = 0
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._worker, name="gpu-d2h-sender", daemon=True)
        self._thread.start()

    def send(
        self,
        link: Any,
        direction: str,
        run_id: str,
        step: int,
        micro_batch: int,
        kind: str,
        tensor: torch.Tensor,
    ) -> None:
        tensor = tensor.detach()
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        producer = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.stream):
            self.stream.wait_stream(producer)  # after the kernels that wrote `tensor`
            host.copy_(tensor, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        # The caching allocator must not hand `tensor`'s memory to the next forward before the
        # side stream has read it.
        tensor.record_stream(self.stream)
        with self._cond:
            if self._error is not None:
                raise StageError(ErrorKind.UNAVAILABLE, f"sending to the peer stage failed: {self._error}")
            self._pending += 1
        self._queue.put((done, host, link, (direction, run_id, step, micro_batch, kind)))

    def _worker(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            done, host, link, args = item
            try:
                done.synchronize()  # waits for this copy only
                link.send(*args, host)
            except BaseException as exc:  # reported by drain / the next send
                with self._cond:
                    self._error = self._error or exc
            finally:
                with self._cond:
                    self._pending -= 1
                    self._cond.notify_all()

    def drain(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending > 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise StageError(
                        ErrorKind.DEADLINE,
                        f"{self._pending} gradient(s) still copying to host after {timeout:.0f}s",
                    )
                self._cond.wait(remaining)
            if self._error is not None:
                err, self._error = self._error, None
                if isinstance(err, StageError):
                    raise err
                raise StageError(ErrorKind.UNAVAILABLE, f"sending to the peer stage failed: {err}")

    def discard(self, timeout: float = 30.0) -> None:
        """After an aborted step: let what is queued reach the link (so it cannot land in the next
        step's sends), then forget its error; the next step starts clean."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending > 0 and time.monotonic() < deadline:
                self._cond.wait(max(0.0, deadline - time.monotonic()))
            self._error = None

    def close(self) -> None:
        self._queue.put(None)
