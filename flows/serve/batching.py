"""Dynamic batching: concurrent requests wait in one bounded queue, and a single task
hands the model whatever is waiting, up to a token budget, as one call per prompt.

The model call runs on a thread of its own; the native code releases the GIL, so the
event loop goes on accepting and parsing requests while a batch computes, and those
requests form the next batch. There is no timer: a request that finds the model idle
runs at once, alone (a short one that is the only request in flight runs on the event
loop's own thread, sparing two thread handoffs); under load, batches grow by
themselves. A call that fails is made again for each of its requests alone, so one
input the model refuses fails only its own request. Inside a call the native embedder
sorts the texts by length and packs its forward passes under ``max_batch_tokens``, as
the flow does with chunks.

The queue is bounded in tokens: a request that would take it past the bound is refused
at once (:class:`Overloaded`, answered 429 with Retry-After) instead of growing memory
and latency. A request over its deadline (``timeout_s``) gets :class:`TimedOut`; if it
was still waiting, it never reaches the model.

On :meth:`Batcher.stop` the model call in flight finishes and answers its requests;
every other request, waiting or taken for a later call, gets :class:`Stopped`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, TypeVar

import numpy as np

from flows.serve.metrics import ServeMetrics

log = logging.getLogger("embedstream.serve")

T = TypeVar("T")
#: ``embed(texts, prompt)``: rows in input order.
EmbedFn = Callable[[list[str], Optional[str]], np.ndarray]


#: A request of at most this many tokens that is alone (no other request in flight) and
#: finds the model idle is computed on the event loop's thread (a few ms at most).
INLINE_TOKENS = 64


class Overloaded(Exception):
    """The queue is full: try again after ``retry_after_s``."""

    def __init__(self, queued_tokens: int, retry_after_s: int) -> None:
        super().__init__(f"the server is busy ({queued_tokens} tokens waiting); retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


class TimedOut(Exception):
    """The request was not answered within the timeout."""


class Stopped(Exception):
    """The batcher is stopping."""


class ModelFailed(Exception):
    """A model call failed (the native code raised, or panicked): answered 500
    ``model_error``. The message is the first line of the cause; the cause, with its
    trace, goes to the log."""

    @classmethod
    def of(cls, error: BaseException) -> ModelFailed:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        failed = cls(first[:300])
        failed.__cause__ = error
        return failed


def call_model(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)``, any failure of it raised as :class:`ModelFailed` (on a model thread:
    the caller tells a model's failure from a store's by its type)."""
    try:
        return fn(*args)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # a PanicException from native code is a BaseException
        raise ModelFailed.of(e) from e


@dataclass(eq=False)
class _Job:
    texts: list[str]
    prompt: Optional[str]
    tokens: int
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)
    #: The request gave up (timeout, client gone): its texts are not embedded.
    dropped: bool = False


class Batcher:
    def __init__(
        self,
        embed: EmbedFn,
        *,
        batch_tokens: int,
        queue_tokens: int,
        timeout_s: float,
        metrics: ServeMetrics,
    ) -> None:
        self._embed = embed
        self.batch_tokens = batch_tokens
        self.queue_tokens = queue_tokens
        self.timeout_s = timeout_s
        self.metrics = metrics
        self._queue: deque[_Job] = deque()
        self._queued_tokens = 0
        self._wake: Optional[asyncio.Event] = None
        self._task: Optional[asyncio.Task] = None
        self._stopping = False
        #: A model call is running (on the model thread, or inline).
        self._busy = False
        #: Jobs taken from the queue whose model call has not answered them yet.
        self._taken: list[_Job] = []
        # One thread: one model call at a time, each using every core the model is given.
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="embedstream-model")
        #: Tokens per second of the recent calls, for Retry-After.
        self._rate = 0.0

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="embedstream-batcher")

    async def stop(self) -> None:
        """Lets the model call in flight finish and answer its requests (what a drain on
        SIGTERM waits for); every other request, waiting or already taken for a later
        call, gets :class:`Stopped`."""
        self._stopping = True
        if self._wake is not None:
            self._wake.set()
        if self._task is not None and not self._task.done():
            try:
                await self._task
            except asyncio.CancelledError:
                if not self._task.cancelled():  # stop() itself was cancelled
                    raise
            except Exception:
                log.exception("the batching task failed")
        for job in [*self._taken, *self._queue]:
            if not job.future.done():
                job.future.set_exception(Stopped("the server is stopping"))
        self._taken = []
        self._queue.clear()
        self._queued_tokens = 0
        self._gauges()
        self._model_thread.shutdown(wait=True)

    def alive(self) -> tuple[bool, str]:
        if self._task is None:
            return False, "the batcher has not started"
        if self._task.done():
            error = None if self._task.cancelled() else self._task.exception()
            return False, f"the batcher stopped: {error or 'cancelled'}"
        return True, "alive"

    # --- requests -------------------------------------------------------------------------------

    async def embed(
        self, texts: list[str], prompt: Optional[str], tokens: int, *, alone: bool = False
    ) -> np.ndarray:
        """The vectors of ``texts`` after ``prompt``, rows in order. ``tokens``: what the
        model will see of them, for the budget. ``alone``: no other request is in flight
        (a short request is then computed at once, inline). Raises :class:`Overloaded`,
        :class:`TimedOut`, :class:`Stopped` or :class:`ModelFailed`."""
        if self._wake is None:
            raise Stopped("the batcher has not started")
        if self._stopping:
            raise Stopped("the server is stopping")
        # An empty queue admits any request, so one larger than the bound is not refused forever.
        if self._queue and self._queued_tokens + tokens > self.queue_tokens:
            self.metrics.rejected.labels("queue_full").inc()
            raise Overloaded(self._queued_tokens, self._retry_after_s())
        if alone and tokens <= INLINE_TOKENS and not self._busy and not self._queue:
            return self._inline(texts, prompt, tokens)
        job = _Job(texts, prompt, tokens, asyncio.get_running_loop().create_future())
        self._queue.append(job)
        self._queued_tokens += tokens
        self._gauges()
        self._wake.set()
        try:
            done, _ = await asyncio.wait({job.future}, timeout=self.timeout_s)
        except asyncio.CancelledError:  # the client went away
            self._drop(job)
            raise
        if not done:
            self._drop(job)
            self.metrics.rejected.labels("timeout").inc()
            raise TimedOut(f"no answer within {self.timeout_s:g} s (EMBEDSTREAM_SERVE_TIMEOUT_S)")
        return job.future.result()

    def _inline(self, texts: list[str], prompt: Optional[str], tokens: int) -> np.ndarray:
        """The model call on the event loop's own thread: no handoff to the model thread
        and back (about 0.3 ms of a 13-token query's 6 ms here). The loop waits for it,
        but no other request is in flight to be held up, and the call is short."""
        self._busy = True
        started = time.monotonic()
        try:
            vectors = call_model(self._embed, texts, prompt)
        except ModelFailed as e:
            log.error("model call of %d inputs failed", len(texts), exc_info=e.__cause__)
            raise
        finally:
            self._busy = False
        self.metrics.queue_wait.observe(0.0)
        self._observe(time.monotonic() - started, len(texts), 1, tokens)
        return vectors

    def _observe(self, took: float, inputs: int, requests: int, tokens: int) -> None:
        self._rate = tokens / took if took > 0 else self._rate
        m = self.metrics
        m.model_calls.inc()
        m.model_seconds.observe(took)
        m.batch_inputs.observe(inputs)
        m.batch_requests.observe(requests)
        m.batch_tokens.observe(tokens)

    def _drop(self, job: _Job) -> None:
        job.dropped = True
        if job in self._queue:
            self._queue.remove(job)
            self._queued_tokens -= job.tokens
            self._gauges()

    def _retry_after_s(self) -> int:
        """Seconds until the queue has drained, at the recent rate (1 to 60)."""
        if self._rate <= 0:
            return 1
        return int(min(60, max(1, round(self._queued_tokens / self._rate))))

    def _gauges(self) -> None:
        self.metrics.queue_tokens.set(self._queued_tokens)
        self.metrics.queue_requests.set(len(self._queue))

    # --- the batching task ----------------------------------------------------------------------

    def _take(self) -> list[_Job]:
        """The waiting jobs, oldest first, up to the token budget (at least one)."""
        jobs: list[_Job] = []
        tokens = 0
        while self._queue:
            job = self._queue[0]
            if jobs and tokens + job.tokens > self.batch_tokens:
                break
            self._queue.popleft()
            self._queued_tokens -= job.tokens
            jobs.append(job)
            tokens += job.tokens
        self._gauges()
        return jobs

    async def _run(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        while not self._stopping:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            self._taken = self._take()
            by_prompt: dict[Optional[str], list[_Job]] = {}
            for job in self._taken:
                by_prompt.setdefault(job.prompt, []).append(job)
            for prompt, group in by_prompt.items():
                if self._stopping:
                    return  # stop() answers the rest of self._taken
                await self._call(loop, prompt, group)
            self._taken = []

    async def _call(
        self, loop: asyncio.AbstractEventLoop, prompt: Optional[str], jobs: list[_Job], retry: bool = False
    ) -> None:
        jobs = [j for j in jobs if not j.dropped]
        if not jobs:
            return
        texts = [t for j in jobs for t in j.texts]
        tokens = sum(j.tokens for j in jobs)
        started = time.monotonic()
        if not retry:  # a retried job's wait was observed with its first call
            for job in jobs:
                self.metrics.queue_wait.observe(started - job.enqueued)
        self._busy = True
        try:
            vectors = await loop.run_in_executor(self._model_thread, self._embed, texts, prompt)
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # a PanicException from native code is a BaseException
            if len(jobs) > 1:
                # One request's input may be what the model refuses: each request alone,
                # so that only it gets the error and the others their vectors.
                log.warning("model call of %d requests failed (%s): each alone", len(jobs), ModelFailed.of(e))
                for job in jobs:
                    if self._stopping:  # stop() waits for this call: no more model calls
                        if not job.future.done():
                            job.future.set_exception(Stopped("the server is stopping"))
                        continue
                    await self._call(loop, prompt, [job], retry=True)
                return
            log.error("model call of %d inputs failed", len(texts), exc_info=e)
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(ModelFailed.of(e))
            return
        finally:
            self._busy = False
        self._observe(time.monotonic() - started, len(texts), len(jobs), tokens)
        at = 0
        for job in jobs:
            rows = vectors[at : at + len(job.texts)]
            at += len(job.texts)
            if not job.future.done():
                job.future.set_result(rows)
