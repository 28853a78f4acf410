"""``embedstream run`` with gates in its transactions, for the exactly-once tests.

    python tests/eos_member.py GATES_DIR run --exactly-once …

Each step of :class:`flows.kafka.transactions.Transactions` named in ``GATES`` first
looks for the file ``GATES_DIR/<step>``: while it exists, the transaction waits there,
after touching ``GATES_DIR/<step>.reached`` and ``GATES_DIR/<step>.<worker index>.reached``.
A test opens a gate to hold a member (each of its workers, with ``-w N``) at an exact
moment (its records produced and confirmed, the commit not sent) and then kills, stops
or releases it. Nothing else changes: the member is the real one.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

#: The steps a test can hold a transaction before: producing its records, sending its
#: input offsets, committing.
GATES = ("_produce", "_send_offsets", "_commit")


def install(gates: Path) -> None:
    from flows.kafka.transactions import Transactions

    for step in GATES:
        original = getattr(Transactions, step)

        def gated(self, *args, _step=step, _original=original, **kwargs):
            gate = gates / _step
            if gate.exists():
                worker = self.transactional_id.rsplit(".", 1)[1]
                (gates / f"{_step}.{worker}.reached").touch()
                (gates / f"{_step}.reached").touch()
                while gate.exists():
                    time.sleep(0.02)
            return _original(self, *args, **kwargs)

        setattr(Transactions, step, gated)


if __name__ == "__main__":
    install(Path(sys.argv[1]))
    from flows.cli import main

    sys.exit(main(sys.argv[2:]))
