"""``embedstream run`` with gates in its transactions, for the exactly-once tests.

    python tests/eos_member.py GATES_DIR run --exactly-once …

Each step of :class:`flows.kafka.transactions.Transactions` named in ``GATES``, and each
step of :class:`flows.embed_steps.Pipeline` named in ``STEPS``, first looks for the file
``GATES_DIR/<step>``: while it exists, the batch waits there, after writing the input
partitions it holds into ``GATES_DIR/<step>.reached`` (and, for a transaction step,
``GATES_DIR/<step>.<worker index>.reached``). A test opens a gate to hold a member (each
of its workers, with ``-w N``) at an exact moment (its records produced and confirmed,
the commit not sent; or its batch not yet at the sink) and then kills, stops or releases
it. A gate file that reads ``poll`` holds the batch as an outage wait does: the member
keeps polling the group meanwhile, so partitions can be revoked and assigned while it
waits. Nothing else changes: the member is the real one.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

#: The steps a test can hold a transaction before: producing its records, sending its
#: input offsets, committing.
GATES = ("_produce", "_send_offsets", "_commit")
#: The pipeline steps a test can hold a batch before, on its way to the sink: its fetch
#: (before it reads the chunk state, as an object-store outage holds it), its embedding.
STEPS = ("fetch_and_extract", "embed")


def _hold(gate: Path, marks: list[Path], partitions: set[int]) -> None:
    try:
        polling = gate.read_text().strip() == "poll"
    except FileNotFoundError:
        return  # released meanwhile
    for mark in marks:  # whole or not at all: a test reads it as soon as it exists
        part = mark.with_name(mark.name + ".part")
        part.write_text(",".join(map(str, sorted(partitions))))
        part.rename(mark)
    if not polling:
        while gate.exists():
            time.sleep(0.02)
        return
    from flows import outage

    def attempt() -> None:
        if gate.exists():
            raise outage.Outage(f"held by the test gate {gate.name}")

    outage.wait_out("test gate", attempt, first_delay_s=0.2, max_delay_s=0.5, beat_s=0.2)


def install(gates: Path) -> None:
    from flows.embed_steps import Pipeline
    from flows.kafka.transactions import Transactions

    for step in GATES:
        original = getattr(Transactions, step)

        def gated(self, *args, _step=step, _original=original, **kwargs):
            gate = gates / _step
            if gate.exists():
                worker = self.transactional_id.rsplit(".", 1)[1]
                marks = [gates / f"{_step}.{worker}.reached", gates / f"{_step}.reached"]
                _hold(gate, marks, set(self.partitions))
            return _original(self, *args, **kwargs)

        setattr(Transactions, step, gated)

    for step in STEPS:
        original = getattr(Pipeline, step)

        def held(self, batch, _step=step, _original=original):
            gate = gates / _step
            if gate.exists():
                _hold(gate, [gates / f"{_step}.reached"], {w.message.partition for w in batch})
            return _original(self, batch)

        setattr(Pipeline, step, held)


if __name__ == "__main__":
    install(Path(sys.argv[1]))
    from flows.cli import main

    sys.exit(main(sys.argv[2:]))
