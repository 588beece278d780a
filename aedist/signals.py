"""Stop requests from signals: handlers only record them; the loop acts at the next step boundary.

Installed first thing by ``launch/train.py`` (before torch is imported, which takes seconds), and
never removed, so a signal at any moment of a run (start-up, training, shutdown) is handled:

- SIGUSR1 / SIGUSR2 / SIGTERM (preemption, time limit, ``scontrol requeue``): save, exit 75, requeue me
  (``train.preempt_signal`` names the one re-installed after the process group is up);
- SIGINT (Ctrl-C): save, exit 130; a second Ctrl-C exits at once.
"""

from __future__ import annotations

import os
import signal
import sys

PREEMPT_EXIT_CODE = 75  # EX_TEMPFAIL: "preempted, checkpoint saved, run me again" (slurm/ requeues on it)
INTERRUPT_EXIT_CODE = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


class StopRequests:
    """Which stop signals arrived since :meth:`install`."""

    def __init__(self) -> None:
        self.preempt = False
        self.interrupt = False

    def install(self) -> StopRequests:
        # USR2 too, from the start: it is train.preempt_signal's alternative, and its default action kills.
        for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM):
            signal.signal(sig, self._on_preempt)
        signal.signal(signal.SIGINT, self._on_interrupt)
        return self

    def listen(self, name: str) -> None:
        """(Re)install the preemption handler for SIG``name`` (train.preempt_signal) once the process group
        is up: some NCCL versions replace a SIGUSR1 handler while they initialise (NVIDIA/nccl#704)."""
        signal.signal(getattr(signal, f"SIG{name}"), self._on_preempt)

    def _on_preempt(self, signum: int, frame: object) -> None:
        self.preempt = True

    def _on_interrupt(self, signum: int, frame: object) -> None:
        if self.interrupt:  # the second Ctrl-C: the user wants out now, not at the next step
            print("interrupted twice: exiting without saving", file=sys.stderr, flush=True)
            os._exit(INTERRUPT_EXIT_CODE)
        self.interrupt = True
        print("interrupt: saving at the next step boundary (Ctrl-C again to quit at once)", file=sys.stderr, flush=True)


STOP = StopRequests()  # one per process: the handlers are process-wide anyway
