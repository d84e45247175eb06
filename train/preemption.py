"""Preemption: SIGTERM and SIGUSR1 make cogtrain finish the step in flight, checkpoint there and exit 75.

Clusters stop jobs with a signal and a grace period: SLURM sends SIGTERM at the time limit or on preemption
(and, with ``--signal=USR1@SECONDS``, SIGUSR1 that many seconds ahead), Kubernetes sends SIGTERM before its
SIGKILL. A handler only raises a flag; the flag travels in the all-reduce every step already makes for its
loss (`train.trainer.Stepper.step`), so all ranks learn of it after the same step, even when the signal reached
one of them only, and nobody waits on a collective the others have left. SIGINT (Ctrl-C) is left alone: it stops
at once, and the run resumes from its last regular checkpoint.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

EXIT_PREEMPTED = 75
"""cogtrain's exit code after a preemption checkpoint (sysexits' EX_TEMPFAIL: stopped, run it again to go on)."""
STOP_SIGNALS = ("SIGTERM", "SIGUSR1")
"""Signals that stop a run at the next step boundary (SIGUSR1 does not exist on Windows)."""


class Preempted(Exception):
    """A stop signal arrived: the run checkpointed at `step` and should exit with `EXIT_PREEMPTED`."""

    def __init__(self, step: int, checkpoint: str, signal_name: str | None):
        self.step, self.checkpoint, self.signal_name = step, checkpoint, signal_name
        by = signal_name or "a signal to another rank"
        super().__init__(f"stopped by {by} after step {step}; checkpoint {checkpoint}: continue with --resume latest")


class StopSignals:
    """While entered, SIGTERM and SIGUSR1 set `received` instead of killing the process."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[signal.Signals, object] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def _handle(self, number: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(number).name

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # Python handles signals there only
            for name in STOP_SIGNALS:
                number = getattr(signal, name, None)
                if number is not None:
                    self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, exc_type: type | None, *exc: object) -> None:
        if exc_type is Preempted:
            # the process is on its way out: a launcher's SIGTERM to the ranks still tearing down (torchrun
            # sends one when the first rank exits) must not cut that short, so the handlers stay
            return
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()
