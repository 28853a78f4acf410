"""Extraction in worker processes, so that no document can take the caller down.

``catch_unwind`` in the native core turns panics into errors, but a stack overflow,
an allocation abort or a parser that never returns would still kill or hang the
process that runs it. Binary formats (PDF, DOCX, images) are therefore parsed in a
small pool of child processes, each under an address-space rlimit and a per-document
deadline. A child that dies or overruns is killed and replaced, and the failure is
reported as an ``ExtractionError`` with its reason; the caller carries on. A child that
is gone leaves nothing behind in the parent: its pipes and stderr file are closed and
the pool forgets it (a long run meets many hostile documents).

Wire format on the child's stdin/stdout: a 4-byte big-endian length and a JSON header,
then an 8-byte length and a binary body (the document bytes going in, RGB pixels
coming out). JSON rather than pickle: the parent never unpickles what a child that
handled hostile input wrote.
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import select
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from typing import IO, Optional

from .document import Audio, Document, Image, Limits
from .errors import ExtractionError

#: Seconds a child gets beyond the document's own time budget before it is killed.
GRACE_SECONDS = 2.0

#: The child starts from the parent's import path, not from its working directory:
#: ``python -m`` would put the directory first, and an ``operators/`` folder there (a
#: source checkout beside an installed wheel, any project with such a folder) would
#: shadow the package the parent runs.
_CHILD_MAIN = (
    "import json, os, sys; "
    "sys.path[:] = json.loads(os.environ['EMBEDSTREAM_PARENT_PATH']); "
    "from operators._worker import main; main()"
)


def _parent_path() -> str:
    # First the folder that holds the very package this process imported.
    home = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return json.dumps([home] + [os.path.abspath(p) if p else os.getcwd() for p in sys.path])


def write_frame(stream: IO[bytes], header: dict, body: bytes = b"") -> None:
    head = json.dumps(header).encode()
    stream.write(struct.pack(">I", len(head)) + head + struct.pack(">Q", len(body)))
    stream.write(body)
    stream.flush()


class _Worker:
    """One child process and the pipes to it."""

    def __init__(self, max_memory_bytes: int) -> None:
        self.stderr = tempfile.TemporaryFile()
        env = dict(
            os.environ,
            EMBEDSTREAM_WORKER_MEMORY=str(max_memory_bytes),
            EMBEDSTREAM_PARENT_PATH=_parent_path(),
        )
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _CHILD_MAIN],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self.stderr,
                env=env,
                # Own session: a Ctrl-C meant for the parent does not kill children mid-document.
                start_new_session=True,
            )
        except BaseException:
            self.stderr.close()
            raise
        self.max_memory_bytes = max_memory_bytes

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """Ends the child (if it still runs) and releases everything the parent holds for it."""
        if self.alive():
            self.proc.kill()
        self.proc.wait()
        self._release()

    def _release(self) -> None:
        for stream in (self.proc.stdin, self.proc.stdout, self.stderr):
            try:
                stream.close()
            except OSError:
                pass  # stdin's unflushed bytes to a dead child: nothing to deliver them to

    def _read_exact(self, n: int, deadline: float) -> Optional[bytes]:
        """Reads n bytes, or returns None on timeout; b'' when the child died."""
        fd = self.proc.stdout.fileno()
        chunks, got = [], 0
        while got < n:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                return None
            chunk = os.read(fd, min(n - got, 1 << 20))
            if not chunk:
                return b""
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def request(self, data: bytes, header: dict, timeout: float) -> tuple[dict, bytes]:
        try:
            write_frame(self.proc.stdin, header, data)
        except (BrokenPipeError, OSError):
            raise self._death() from None
        deadline = time.monotonic() + timeout
        size = self._read_exact(4, deadline)
        if size is None:
            raise self._overrun(timeout)
        if len(size) < 4:
            raise self._death()
        head = self._read_exact(struct.unpack(">I", size)[0] + 8, deadline)
        if head is None:
            raise self._overrun(timeout)
        if len(head) < struct.unpack(">I", size)[0] + 8:
            raise self._death()
        body_len = struct.unpack(">Q", head[-8:])[0]
        body = self._read_exact(body_len, deadline) if body_len else b""
        if body is None:
            raise self._overrun(timeout)
        if len(body) < body_len:
            raise self._death()
        return json.loads(head[:-8]), body

    def _overrun(self, timeout: float) -> ExtractionError:
        """Kills a child past its deadline (also one halfway through its reply: the
        rest of it must not be read as the next document's)."""
        self.kill()
        return ExtractionError("timeout", f"extraction took longer than {timeout:.1f} s")

    def _death(self) -> ExtractionError:
        """Maps how the child died to a reason; the child is gone afterwards."""
        code = self.proc.wait()
        self.stderr.seek(0)
        tail = self.stderr.read()[-2000:].decode("utf-8", "replace")
        self._release()
        if "memory allocation" in tail or "MemoryError" in tail or code == -signal.SIGKILL:
            return ExtractionError(
                "too_large", f"extraction exceeded the memory limit of {self.max_memory_bytes} bytes"
            )
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
        detail = tail.strip().splitlines()[-1] if tail.strip() else ""
        return ExtractionError("corrupt", f"extractor process died ({how}) {detail}".strip())


class ExtractorPool:
    """A fixed number of extraction child processes, started on demand and shared by
    threads. ``extract`` blocks until a child is free."""

    def __init__(self, workers: int = 2) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self.size = workers
        self._idle: queue.LifoQueue[Optional[_Worker]] = queue.LifoQueue()
        for _ in range(workers):
            self._idle.put(None)  # a slot; the process starts on first use
        self._all: list[_Worker] = []
        self._lock = threading.Lock()
        self._closed = False

    def extract(
        self,
        data: bytes,
        *,
        mime_type: Optional[str] = None,
        filename: Optional[str] = None,
        limits: Limits,
    ) -> Document:
        if self._closed:
            raise RuntimeError("ExtractorPool is closed")
        worker = self._idle.get()
        try:
            if worker is None or not worker.alive() or worker.max_memory_bytes != limits.max_memory_bytes:
                if worker is not None:
                    self._retire(worker)
                    worker = None
                worker = _Worker(limits.max_memory_bytes)
                with self._lock:
                    self._all.append(worker)
            header = {"mime_type": mime_type, "filename": filename, "limits": limits.native()}
            reply, body = worker.request(bytes(data), header, limits.timeout_ms / 1000 + GRACE_SECONDS)
        except BaseException:
            # Whatever broke off the exchange (a death, an overrun, an interrupt halfway
            # through a reply), the child's stream is in an unknown state: it goes.
            if worker is not None:
                self._retire(worker)
                worker = None
            raise
        finally:
            if worker is not None and not worker.alive():
                self._retire(worker)
                worker = None
            self._idle.put(worker)
        if "error" in reply:
            raise ExtractionError(reply["error"], reply["message"])
        image, audio_rate = reply.pop("image", None), reply.pop("audio", None)
        return Document(
            text=reply["text"],
            mime_type=reply["mime_type"],
            pages=[tuple(p) for p in reply["pages"]],
            title=reply["title"],
            metadata=reply["metadata"],
            image=Image(image[0], image[1], body) if image else None,
            audio=Audio.from_bytes(audio_rate, body) if audio_rate else None,
        )

    def _retire(self, worker: _Worker) -> None:
        """Ends a worker for good: closes what the parent holds for it, forgets it."""
        worker.kill()
        with self._lock:
            try:
                self._all.remove(worker)
            except ValueError:
                pass  # close() got there first

    def close(self) -> None:
        self._closed = True
        with self._lock:
            for worker in self._all:
                worker.kill()
            self._all.clear()

    def __enter__(self) -> ExtractorPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_default_pool: Optional[ExtractorPool] = None
_default_lock = threading.Lock()


def default_pool() -> ExtractorPool:
    """The process-wide pool that ``operators.extract`` uses (2 children, started lazily)."""
    global _default_pool
    with _default_lock:
        if _default_pool is None:
            _default_pool = ExtractorPool(int(os.environ.get("EMBEDSTREAM_EXTRACT_WORKERS", "2")))
            atexit.register(_default_pool.close)
        return _default_pool
