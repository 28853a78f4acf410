"""The batcher of `embedstream serve` in-process, on a real model: what it hands the
model in one call (one per prompt, up to the token budget, oldest first), and that the
rows each request gets back are its own."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from conftest import DATA

from flows.serve.batching import Batcher, Overloaded, Stopped
from flows.serve.metrics import ServeMetrics
from operators import Embedder


@pytest.fixture(scope="module")
def prompted():
    return Embedder.load(DATA / "tiny-prompted")  # prompts: query "query: ", document "passage: "


class Recording:
    """The real model, with each call's texts and prompt written down."""

    def __init__(self, embedder: Embedder) -> None:
        self.embedder = embedder
        self.calls: list[tuple[list[str], object]] = []

    def __call__(self, texts: list[str], prompt: object) -> np.ndarray:
        self.calls.append((list(texts), prompt))
        return self.embedder.embed(texts, prompt=prompt)


def run(embed: Recording, jobs: list[tuple[list[str], object, int]], **kw: int) -> list[object]:
    """Submits every job before the batcher first runs, as requests that arrive while
    the model is busy; returns each job's result or error."""

    async def main() -> list[object]:
        batcher = Batcher(embed, timeout_s=60, metrics=ServeMetrics(), **kw)
        batcher.start()
        try:
            return await asyncio.gather(
                *(batcher.embed(texts, prompt, tokens) for texts, prompt, tokens in jobs),
                return_exceptions=True,
            )
        finally:
            await batcher.stop()

    return asyncio.run(main())


def test_waiting_requests_share_one_call_per_prompt_and_get_their_own_rows(prompted):
    query, passage = prompted.prompts["query"], prompted.prompts["document"]
    jobs = [([f"text {i}", f"another text {i}"], query if i % 2 else passage, 20) for i in range(10)]
    embed = Recording(prompted)
    results = run(embed, jobs, batch_tokens=10_000, queue_tokens=10_000)
    assert sorted(prompt for _, prompt in embed.calls) == sorted([query, passage])  # two calls, not ten
    for (texts, prompt, _), got in zip(jobs, results):
        np.testing.assert_array_equal(got, prompted.embed(texts, prompt=prompt))


def test_the_token_budget_splits_calls_oldest_first(prompted):
    jobs = [([f"text {i}"], None, 30) for i in range(7)]
    embed = Recording(prompted)
    results = run(embed, jobs, batch_tokens=100, queue_tokens=10_000)
    # 30 tokens each, at most 100 a call: 3 + 3 + 1, in arrival order.
    assert [texts for texts, _ in embed.calls] == [
        ["text 0", "text 1", "text 2"],
        ["text 3", "text 4", "text 5"],
        ["text 6"],
    ]
    for (texts, _, _), got in zip(jobs, results):
        np.testing.assert_array_equal(got, prompted.embed(texts))


def test_a_full_queue_refuses_at_once_but_an_empty_one_takes_any_request(prompted):
    embed = Recording(prompted)
    jobs = [(["a long request"], None, 500), (["next"], None, 10), (["and next"], None, 10)]
    results = run(embed, jobs, batch_tokens=1000, queue_tokens=100)
    assert isinstance(results[0], np.ndarray)  # over the bound, but the queue was empty
    assert all(isinstance(r, Overloaded) and r.retry_after_s >= 1 for r in results[1:])
    assert [texts for texts, _ in embed.calls] == [["a long request"]]


def test_stop_answers_the_call_in_flight_and_refuses_the_jobs_it_had_taken(prompted):
    """Jobs the batching task has taken from the queue are answered on stop: those in the
    model call in flight get their vectors, those of a later call (another prompt) get
    Stopped. None waits for its timeout."""
    import threading

    query, passage = prompted.prompts["query"], prompted.prompts["document"]
    entered, release = threading.Event(), threading.Event()

    def gated(texts: list[str], prompt: object) -> np.ndarray:
        entered.set()  # the call is in flight: stop() comes now
        assert release.wait(30)
        return prompted.embed(texts, prompt=prompt)

    async def main() -> tuple[list[object], float]:
        batcher = Batcher(
            gated, batch_tokens=10_000, queue_tokens=10_000, timeout_s=20, metrics=ServeMetrics()
        )
        batcher.start()
        # Both are waiting when the task first runs: one take, two calls (one per prompt).
        requests = [
            asyncio.ensure_future(batcher.embed(["in flight"], query, 5)),
            asyncio.ensure_future(batcher.embed(["taken, not started"], passage, 5)),
        ]
        assert await asyncio.to_thread(entered.wait, 30)
        started = asyncio.get_running_loop().time()
        stopping = asyncio.ensure_future(batcher.stop())
        await asyncio.sleep(0.2)
        release.set()
        results = await asyncio.gather(*requests, return_exceptions=True)
        await stopping
        return results, asyncio.get_running_loop().time() - started

    (flown, taken), took = asyncio.run(main())
    np.testing.assert_array_equal(flown, prompted.embed(["in flight"], prompt=query))
    assert isinstance(taken, Stopped), taken
    assert took < 10  # answered on stop, not at the 20 s timeout
