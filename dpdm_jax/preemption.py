"""SIGTERM (preemption, `kill`, a scheduler's time limit): finish the step, checkpoint, stop.

Without this a single process died mid-step and lost the steps since its last checkpoint, and a
multi-process run ignored SIGTERM altogether (jax.distributed's preemption notifier catches it and
waits for the program to ask) until the scheduler's SIGKILL. Either way the replayed steps are
bit-identical, so nothing is released twice; this only saves the work.
"""
from __future__ import annotations

import signal
import threading

import jax

# The exit status of a preempted run: 128 + SIGTERM, as if the signal had ended it (not done).
EXIT_STATUS = 128 + signal.SIGTERM


class Preempted(Exception):
    """Training stopped at a step boundary on SIGTERM, after saving a checkpoint."""

    def __init__(self, step: int):
        super().__init__(f"preempted (SIGTERM) after step {step}: checkpoint {step} is saved; rerun the same "
                         "command to resume")
        self.step = step


class PreemptionWatch:
    """Has a SIGTERM arrived? Asked once per logical step, with the same step on every host.

    One process: a SIGTERM handler sets a flag (installed from the main thread only, restored by
    `close`, or on leaving a `with` block). Several processes: jax.distributed's preemption sync
    manager, so that every host stops after the same step.
    """

    def __init__(self):
        self._multiprocess = jax.process_count() > 1
        self._requested = False
        self._installed = not self._multiprocess and threading.current_thread() is threading.main_thread()
        if self._installed:
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        self._requested = True

    def reached(self, step: int) -> bool:
        """True if training should checkpoint and stop after `step` (a collective when multi-process)."""
        if self._multiprocess:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self._requested

    def close(self) -> None:
        if self._installed:  # None: the previous handler was not set from Python; the default then
            signal.signal(signal.SIGTERM, signal.SIG_DFL if self._previous is None else self._previous)
            self._installed = False

    def __enter__(self) -> PreemptionWatch:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
