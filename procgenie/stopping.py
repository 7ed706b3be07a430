"""Stopping on SIGTERM (a cluster's preemption: SLURM, Kubernetes) or SIGINT (Ctrl-C) without losing work.

`train` and `collect` run their loops inside `StopSignals`: a signal only sets `signum`, the loop finishes
what is in flight, saves it (atomically, as always), and raises `errors.Stopped`, which the command line
turns into one line and exit status 128 + the signal.
"""

from __future__ import annotations

import signal
import threading


class StopSignals:
    """While active, SIGTERM (preemption: SLURM, Kubernetes) and SIGINT (Ctrl-C) only note the signal, so the
    loop can finish the step in flight and checkpoint it; a second SIGINT interrupts at once (every write is
    atomic either way). Outside the main thread (where handlers cannot be set) it does nothing."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self._old: dict = {}

    def _note(self, signum, frame) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._note) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)
