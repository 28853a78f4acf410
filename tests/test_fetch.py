"""``file://`` fetches on a hostile file system: symbolic links swapped in while the flow
reads, FIFOs, /proc and device files, and files over the limit. Each ends as a
:class:`FetchError` with its reason (a dead letter), never blocks a thread, never reads
outside the allowed roots and never reads more than the limit plus one byte."""

from __future__ import annotations

import io
import os
import threading
import time
from pathlib import Path

import pytest

from flows.fetch import FetchError, fetch, read_bounded


@pytest.fixture
def layout(tmp_path):
    """An allowed root with one document, and a secret outside it."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "doc.txt").write_bytes(b"inside")
    (outside / "doc.txt").write_bytes(b"SECRET")
    return root.resolve(), outside.resolve()


def reason_of(uri: str, roots, max_bytes: int = 1 << 20) -> str:
    with pytest.raises(FetchError) as e:
        fetch(uri, roots=roots, max_bytes=max_bytes)
    return e.value.reason


def test_a_plain_file_under_the_root_is_read(layout):
    root, _ = layout
    assert fetch(f"file://{root}/doc.txt", roots=[root], max_bytes=6) == b"inside"
    assert reason_of(f"file://{root}/doc.txt", [root], max_bytes=5) == "too_large"
    assert reason_of(f"file://{root}/missing.txt", [root]) == "not_found"
    assert reason_of(f"file://{root}/../outside/doc.txt", [root]) == "uri_not_allowed"


def test_links_out_of_the_root_are_refused(layout):
    root, outside = layout
    (root / "file-link").symlink_to(outside / "doc.txt")
    (root / "dir-link").symlink_to(outside)
    assert reason_of(f"file://{root}/file-link", [root]) == "uri_not_allowed"
    assert reason_of(f"file://{root}/dir-link/doc.txt", [root]) == "uri_not_allowed"


@pytest.mark.parametrize("swapped", ["file", "directory"])
def test_a_link_swapped_in_while_reading_never_leaks(layout, swapped):
    """Another thread swaps the document, or a directory link on its path, between the
    real thing and a link out of the root, atomically and as fast as it can; every read
    in between returns the document or refuses, never the secret."""
    root, outside = layout
    if swapped == "file":
        uri, target = f"file://{root}/doc.txt", root / "doc.txt"

        def make(inside: bool, tmp: Path) -> None:
            tmp.write_bytes(b"inside") if inside else tmp.symlink_to(outside / "doc.txt")
    else:
        (root / "real").mkdir()
        (root / "real" / "doc.txt").write_bytes(b"inside")
        uri, target = f"file://{root}/sub/doc.txt", root / "sub"

        def make(inside: bool, tmp: Path) -> None:
            tmp.symlink_to(root / "real" if inside else outside)

    stop = threading.Event()

    def swap():
        while not stop.is_set():
            for inside in (True, False):
                make(inside, root / "next.tmp")
                os.replace(root / "next.tmp", target)

    swapper = threading.Thread(target=swap, daemon=True)
    swapper.start()
    seen: set = set()
    deadline = time.monotonic() + 5
    try:
        while time.monotonic() < deadline and b"SECRET" not in seen:
            try:
                seen.add(fetch(uri, roots=[root], max_bytes=1 << 20))
            except FetchError as e:
                seen.add(e.reason)
            except OSError as e:  # not a dead letter: the worker would log an internal error
                seen.add(f"{type(e).__name__}: {e}")
    finally:
        stop.set()
        swapper.join()
    assert b"SECRET" not in seen, seen
    assert seen <= {b"inside", "uri_not_allowed", "not_found"}, seen
    assert "uri_not_allowed" in seen, seen  # the race really ran both ways
    if swapped == "directory":
        assert b"inside" in seen, seen  # a link that stays inside the root is followed


def test_a_fifo_is_refused_without_blocking(layout):
    root, _ = layout
    fifo = root / "pipe"
    os.mkfifo(fifo)
    outcome: list = []

    def read():
        try:
            outcome.append(fetch(f"file://{fifo}", roots=[root], max_bytes=1 << 20))
        except FetchError as e:
            outcome.append(e.reason)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(10)
    blocked = reader.is_alive()
    if blocked:  # release the reader: a writer opens and closes the FIFO
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(10)
    assert not blocked, "fetch blocked on a FIFO"
    assert outcome == ["not_a_file"]


def test_proc_and_device_files_are_refused():
    proc = Path(f"/proc/{os.getpid()}")
    assert reason_of(f"file://{proc}/status", [proc]) == "not_a_file"
    assert reason_of("file:///dev/null", [Path("/dev")]) == "not_a_file"
    assert reason_of("file:///dev/zero", [Path("/dev")]) == "not_a_file"


def test_read_bounded_reads_the_limit_plus_one_byte_at_most(tmp_path):
    # A stream far over the limit: refused after limit + 1 bytes, the rest unread.
    stream = io.BytesIO(b"x" * (10 << 20))
    with pytest.raises(FetchError) as e:
        read_bounded(stream, 1 << 20)
    assert e.value.reason == "too_large" and stream.tell() == (1 << 20) + 1
    assert read_bounded(io.BytesIO(b"abc"), 3) == b"abc"
    # A file descriptor of a pipe whose writer never stops: the same, and no hang.
    r, w = os.pipe()
    writer = threading.Thread(target=lambda: _write_forever(w), daemon=True)
    writer.start()
    try:
        with pytest.raises(FetchError) as e:
            read_bounded(r, 100_000)
        assert e.value.reason == "too_large"
    finally:
        os.close(r)
        writer.join(10)
    (tmp_path / "f").write_bytes(b"12345")
    with open(tmp_path / "f", "rb") as f:
        assert read_bounded(f.fileno(), 5) == b"12345"


def _write_forever(fd: int) -> None:
    try:
        while True:
            os.write(fd, b"y" * 65536)
    except OSError:  # the reader closed its end
        os.close(fd)
