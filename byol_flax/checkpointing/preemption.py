"""SIGTERM on one host: a notice that the run must save and stop, read by the checkpointer.

Under ``jax.distributed`` the preemption service owns SIGTERM and Orbax's sync point
(``CheckpointManager.reached_preemption``) makes every host stop at the same step; a per-host
flag could stop hosts at different steps, so this guard is installed on single-process runs
only. :meth:`byol_flax.checkpointing.Checkpointer.maybe_save` reads both.
"""

import logging
import signal
import threading


class TerminationGuard:
    """Turns SIGTERM (a single-host preemption notice, ``kill``) into a flag read at step ends.

    Installed before anything else starts, so a SIGTERM during start-up still ends in a clean
    save at the first step boundary.
    """

    def __init__(self, enabled: bool = True):
        self.requested = False
        self._previous = None
        if enabled and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        logging.warning("SIGTERM received: saving a checkpoint at the end of this step")
        self.requested = True

    def restore(self) -> None:
        """Puts back the handler that was there before (the process outlives the run)."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
