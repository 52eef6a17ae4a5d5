"""Where a launch spends its time: the wall seconds of its phases, written to summary.json."""

from __future__ import annotations

import time


class Phases:
    """Wall seconds of a launch's phases, in order, for summary.json's ``phases`` (issue 13: the
    seconds to the first step). ``mark(name)`` closes the phase that began at the previous mark."""

    def __init__(self, started: float | None = None):
        import psutil

        now = time.time()
        self.started = started if started is not None else now
        # The interpreter and the imports before main (in a process that runs several
        # configurations, as bench/gpu_worker.py does, everything before this one).
        self.seconds = {"before_main": round(self.started - psutil.Process().create_time(), 3)}
        self.last = self.started

    def mark(self, name: str) -> None:
        now = time.time()
        self.seconds[name] = round(now - self.last, 3)
        self.last = now

    def since_start(self) -> float:
        return round(time.time() - self.started, 3)
