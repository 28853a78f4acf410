"""The batcher of `embedstream serve` in-process, on a real model: what it hands the
model in one call (one per prompt, up to the token budget, oldest first), and that the
rows each request gets back are its own."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA

from flows.serve.batching import INLINE_TOKENS, Batcher, ModelFailed, Overloaded, Stopped
from flows.serve.metrics import ServeMetrics
from operators import Embedder


@pytest.fixture(scope="module")
def prompted():
    return Embedder.load(DATA / "tiny-prompted")  # prompts: query "query: ", document "passage: "


def mismatched_copy(model: str, into: Path) -> str:
    """A copy of a tiny model whose tokenizer knows one token more than the model's
    vocabulary, "[OOV]" (as a tokenizer from another revision would): it loads and
    answers, and the model's native call fails on any input containing "[OOV]" (candle:
    index-select invalid index)."""
    shutil.copytree(DATA / model, into)
    vocab = json.loads((into / "config.json").read_text())["vocab_size"]
    tokenizer = json.loads((into / "tokenizer.json").read_text())
    tokenizer["added_tokens"].append(
        {"id": vocab, "content": "[OOV]", "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": False}
    )  # fmt: skip
    (into / "tokenizer.json").write_text(json.dumps(tokenizer))
    return str(into)


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


def test_an_input_the_model_refuses_fails_its_own_request_only(tmp_path):
    """A call that fails is made again per request: the others get their vectors."""
    mismatched = Embedder.load(mismatched_copy("tiny-prompted", tmp_path / "m"))
    embed = Recording(mismatched)
    jobs = [(["fine"], None, 5), (["an [OOV] text"], None, 5), (["also fine", "and this"], None, 5)]
    results = run(embed, jobs, batch_tokens=1000, queue_tokens=1000)
    assert isinstance(results[1], ModelFailed) and "invalid index" in str(results[1])
    assert "\n" not in str(results[1])  # the first line; the trace goes to the log
    for i in (0, 2):
        np.testing.assert_array_equal(results[i], mismatched.embed(jobs[i][0]))
    assert [texts for texts, _ in embed.calls] == [
        ["fine", "an [OOV] text", "also fine", "and this"],
        ["fine"],
        ["an [OOV] text"],
        ["also fine", "and this"],
    ]


def test_a_failed_call_is_not_made_again_per_request_once_stop_was_asked(tmp_path):
    """stop() waits for the call in flight; if that call fails, its requests are not
    retried one by one (more model calls during the drain) but refused with Stopped."""
    import threading

    mismatched = Embedder.load(mismatched_copy("tiny-prompted", tmp_path / "m"))
    embed = Recording(mismatched)
    entered, release = threading.Event(), threading.Event()

    def gated(texts: list[str], prompt: object) -> np.ndarray:
        entered.set()
        assert release.wait(30)
        return embed(texts, prompt)

    async def main() -> tuple[list[object], ServeMetrics]:
        metrics = ServeMetrics()
        batcher = Batcher(gated, batch_tokens=1000, queue_tokens=1000, timeout_s=20, metrics=metrics)
        batcher.start()
        requests = [
            asyncio.ensure_future(batcher.embed(texts, None, 5)) for texts in (["fine"], ["an [OOV] text"])
        ]
        assert await asyncio.to_thread(entered.wait, 30)
        stopping = asyncio.ensure_future(batcher.stop())
        await asyncio.sleep(0.2)
        release.set()
        results = await asyncio.gather(*requests, return_exceptions=True)
        await stopping
        return results, metrics

    results, metrics = asyncio.run(main())
    assert all(isinstance(r, Stopped) for r in results), results
    assert len(embed.calls) == 1  # the failed call only, no retries
    # Each request's wait is observed once, with the call it first went into.
    assert metrics.registry.get_sample_value("embedstream_serve_queue_seconds_count") == 2


def test_a_short_request_alone_runs_on_the_loops_thread_and_others_on_the_model_thread(prompted):
    """A short request with no other in flight is computed at once on the event loop's
    thread; one that is long, or not alone, goes to the model thread. Same vectors."""
    import threading

    threads: list[int] = []

    def embed(texts: list[str], prompt: object) -> np.ndarray:
        threads.append(threading.get_ident())
        return prompted.embed(texts, prompt=prompt)

    async def main() -> tuple[int, list[np.ndarray]]:
        batcher = Batcher(
            embed, batch_tokens=10_000, queue_tokens=10_000, timeout_s=60, metrics=ServeMetrics()
        )
        batcher.start()
        try:
            got = [
                await batcher.embed(["short"], None, INLINE_TOKENS, alone=True),
                await batcher.embed(["long"], None, INLINE_TOKENS + 1, alone=True),
                await batcher.embed(["not alone"], None, 3, alone=False),
            ]
        finally:
            await batcher.stop()
        return threading.get_ident(), got

    loop_thread, got = asyncio.run(main())
    assert threads[0] == loop_thread and threads[1] != loop_thread and threads[2] != loop_thread
    for text, vectors in zip(["short", "long", "not alone"], got):
        np.testing.assert_array_equal(vectors, prompted.embed([text]))
