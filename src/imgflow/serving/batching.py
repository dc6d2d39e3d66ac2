"""Micro-batching: requests that arrive together share one forward pass.

On a CPU a forward pass of 32 small images costs little more than one of a single image, so a
server that ran each request alone would reach a fraction of `imgflow predict`'s batched rate.
Each request's images wait in an asyncio queue; one consumer takes the first, waits a short,
bounded time (`max_wait_s`) for others when none are queued yet, takes up to `max_batch` images,
and runs the model in a worker thread, so that the event loop keeps accepting requests meanwhile.
While the model runs, new requests queue up and form the next batch. One thread runs the model:
calls never overlap, so PyTorch's own threads are not oversubscribed.
"""
from __future__ import annotations

import asyncio
import contextlib
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np

Forward = Callable[[np.ndarray], np.ndarray]  # uint8 (N, H, W, C) -> float (N, K)


class MicroBatcher:
    """Batches `submit` calls from concurrent requests into calls of `forward`."""

    def __init__(self, forward: Forward, max_batch: int = 64, max_wait_s: float = 0.005):
        assert max_batch >= 1, f"max_batch must be >= 1, got {max_batch}"
        self.forward = forward
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.calls = 0  # forward passes so far
        self.images = 0  # images through them
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="imgflow-model")
        self._task = asyncio.create_task(self._run(), name="imgflow-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while self._queue is not None and not self._queue.empty():
            _, future = self._queue.get_nowait()
            if not future.done():
                future.set_exception(RuntimeError("the server is shutting down"))
        if self._executor is not None:
            self._executor.shutdown(wait=False)

    async def submit(self, images: np.ndarray) -> np.ndarray:
        """Probabilities (N, K) for uint8 images (N, H, W, C), computed in some batch."""
        assert self._queue is not None, "MicroBatcher.start() was not called"
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((images, future))
        return await future

    async def _run(self) -> None:
        while True:
            items = await self._collect()
            await self._process(items)

    async def _collect(self) -> list[tuple[np.ndarray, asyncio.Future]]:
        """The first waiting request, plus those arriving within max_wait_s, up to max_batch images."""
        items = [await self._queue.get()]
        if self._queue.empty() and self.max_wait_s > 0:
            # Sleep once rather than wait on the queue with a timeout: nothing to cancel, no race.
            await asyncio.sleep(self.max_wait_s)
        count = len(items[0][0])
        while count < self.max_batch and not self._queue.empty():
            items.append(self._queue.get_nowait())
            count += len(items[-1][0])
        return items

    async def _process(self, items: list[tuple[np.ndarray, asyncio.Future]]) -> None:
        live = [(images, future) for images, future in items if not future.done()]  # skip cancelled
        if not live:
            return
        loop = asyncio.get_running_loop()
        try:
            probs = await loop.run_in_executor(self._executor, self._forward,
                                               np.concatenate([images for images, _ in live]))
        except Exception as exc:  # noqa: BLE001 - the requests get the error, the server goes on
            for _, future in live:
                if not future.done():
                    future.set_exception(exc)
            return
        start = 0
        for images, future in live:
            if not future.done():
                future.set_result(probs[start:start + len(images)])
            start += len(images)

    def _forward(self, images: np.ndarray) -> np.ndarray:
        """In the worker thread: the model on `images`, max_batch at a time."""
        parts = []
        for start in range(0, len(images), self.max_batch):
            parts.append(self.forward(images[start:start + self.max_batch]))
            self.calls += 1
            self.images += len(parts[-1])
        return np.concatenate(parts)
