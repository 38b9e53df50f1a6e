"""What a person reads on the console: one line per stage and a progress bar per pre-training.

Both show only once :func:`byol_flax.runtime.logs.setup` routed the full log to a file (the
commands that write a workdir); in library use (tests, notebooks) a stage line is an ordinary
log record and the progress bar is disabled. Where the log records go:
:mod:`byol_flax.runtime.logs`; how a command starts and reports an error:
:mod:`byol_flax.runtime.commands`.
"""

import logging
import sys
import weakref
from typing import Any

import tqdm

from byol_flax.runtime import logs


def stage(message: str, *args: Any) -> None:
    """One line a person reads on the console (and in the log file)."""
    if logs.Settings.enabled:
        logs.STAGE_LOGGER.info(message, *args)
    else:
        logging.info(message, *args)


# The progress bars shown: one may have left the console mid-line.
_BARS: "weakref.WeakSet[tqdm.tqdm]" = weakref.WeakSet()


def progress(total: int, initial: int, description: str) -> "tqdm.tqdm":
    """A progress bar of steps (disabled unless :func:`setup` was called)."""
    bar = tqdm.tqdm(total=total, initial=initial, desc=description, unit="step",
                    disable=not logs.Settings.enabled, dynamic_ncols=True, leave=True,
                    mininterval=1.0 if sys.stderr.isatty() else 30.0, file=sys.stderr)
    _BARS.add(bar)
    return bar


def interrupt(line: str) -> None:
    """``line`` on the console at once, from any thread, on a line of its own even while a
    progress bar is drawn (tqdm closes a bar by setting ``disable``): for a run that stops
    itself without unwinding."""
    open_bar = any(not bar.disable for bar in list(_BARS))
    sys.__stderr__.write(("\n" if open_bar else "") + line + "\n")
    sys.__stderr__.flush()
