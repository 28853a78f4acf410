"""The extraction pool: a child that dies, hangs or overruns costs one document."""

from __future__ import annotations

import os
import signal
import time

import docgen
import pytest

from operators import ExtractionError, ExtractorPool, Limits, extract


@pytest.fixture
def pool():
    with ExtractorPool(1) as p:
        yield p


def _child_pid(pool: ExtractorPool) -> int:
    # Internals on purpose: the test plays the part of a parser that hangs or crashes.
    alive = [w for w in pool._all if w.alive()]
    assert len(alive) == 1
    return alive[0].proc.pid


def test_isolated_extraction_round_trip(pool):
    doc = extract(docgen.make_pdf(["hello from a child"]), pool=pool)
    assert doc.text == "hello from a child"
    img = extract(docgen.make_png(5, 4, (1, 2, 3)), pool=pool)
    assert img.image.data == bytes([1, 2, 3]) * 20
    assert _child_pid(pool) != os.getpid()


def test_errors_come_back_typed(pool):
    with pytest.raises(ExtractionError) as info:
        extract(docgen.make_pdf(["x"], user_password="pw"), pool=pool)
    assert info.value.reason == "encrypted"


def test_hung_child_is_killed_and_replaced(pool):
    extract(docgen.make_pdf(["warm up"]), pool=pool)
    stuck = _child_pid(pool)
    os.kill(stuck, signal.SIGSTOP)  # a parser stuck in an endless loop, as far as the parent can tell
    started = time.monotonic()
    with pytest.raises(ExtractionError) as info:
        extract(docgen.make_pdf(["never read"]), pool=pool, limits=Limits(timeout_ms=300))
    assert info.value.reason == "timeout"
    assert time.monotonic() - started < 20
    assert extract(docgen.make_pdf(["next document"]), pool=pool).text == "next document"
    assert _child_pid(pool) != stuck


def test_crashed_child_costs_one_document(pool):
    extract(docgen.make_pdf(["warm up"]), pool=pool)
    victim = _child_pid(pool)
    os.kill(victim, signal.SIGSEGV)
    time.sleep(0.2)
    # The dead child is noticed before the next document is sent: nothing is lost.
    assert extract(docgen.make_pdf(["after crash"]), pool=pool).text == "after crash"
    assert _child_pid(pool) != victim


def test_memory_limit_ends_as_too_large(pool):
    # 36 Mpx is under the pixel limit, but decoding needs ~100 MiB: over a 48 MiB rlimit.
    big = docgen.make_png(6000, 6000)
    with pytest.raises(ExtractionError) as info:
        extract(big, pool=pool, limits=Limits(max_memory_bytes=48 << 20))
    assert info.value.reason == "too_large"
    assert extract(docgen.make_png(2, 2), pool=pool).image.width == 2


def test_pool_is_shared_by_threads():
    from concurrent.futures import ThreadPoolExecutor

    with ExtractorPool(2) as pool:
        files = [docgen.make_pdf([f"document {i}"]) for i in range(12)]
        with ThreadPoolExecutor(4) as ex:
            texts = list(ex.map(lambda d: extract(d, pool=pool).text, files))
    assert texts == [f"document {i}" for i in range(12)]
