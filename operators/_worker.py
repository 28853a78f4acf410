"""Child process of ``operators.isolation``: extracts documents it reads from stdin."""

from __future__ import annotations

import json
import os
import resource
import struct
import sys

from . import _native
from .errors import ExtractionError
from .isolation import write_frame


def _limit_memory() -> None:
    extra = int(os.environ.get("EMBEDSTREAM_WORKER_MEMORY", "0"))
    if extra <= 0:
        return
    with open("/proc/self/status") as status:
        vm = next((line for line in status if line.startswith("VmSize:")), None)
    baseline = int(vm.split()[1]) * 1024 if vm else 0
    resource.setrlimit(resource.RLIMIT_AS, (baseline + extra, baseline + extra))


def _read_exact(stream, n: int) -> bytes:
    buf = stream.read(n)
    if len(buf) < n:
        raise EOFError
    return buf


def main() -> None:
    _limit_memory()
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        try:
            head = _read_exact(stdin, struct.unpack(">I", _read_exact(stdin, 4))[0])
            data = _read_exact(stdin, struct.unpack(">Q", _read_exact(stdin, 8))[0])
        except EOFError:
            return  # parent closed the pipe or died: nothing left to do
        request = json.loads(head)
        try:
            raw = _native.extract(data, request["mime_type"], request["filename"], request["limits"])
        except ExtractionError as e:
            write_frame(stdout, {"error": e.reason, "message": e.message})
            continue
        except MemoryError:
            write_frame(stdout, {"error": "too_large", "message": "extraction ran out of memory"})
            continue
        image, audio = raw.pop("image"), raw.pop("audio")
        body = b""
        if image is not None:
            raw["image"] = [image[0], image[1]]
            body = image[2]
        elif audio is not None:
            raw["audio"] = audio[0]  # the sample rate; the samples are the body
            body = audio[1]
        write_frame(stdout, raw, body)


if __name__ == "__main__":
    main()
