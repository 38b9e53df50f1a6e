"""What a person reads on the console: one line per stage and a progress bar per pre-training.

Both show only once :func:`byol_flax.runtime.logs.setup` routed the full log to a file (the
commands that write a workdir); in library use (tests, notebooks) a stage line is an ordinary
log record and the progress bar is disabled. Where the log records go:
:mod:`byol_flax.runtime.logs`; how a command starts and reports an error:
:mod:`byol_flax.runtime.commands`.
"""

import logging
import sys
from typing import Any

import tqdm

from byol_flax.runtime import logs


def stage(message: str, *args: Any) -> None:
    """One line a person reads on the console (and in the log file)."""
    if logs.Settings.enabled:
        logs.STAGE_LOGGER.info(message, *args)
    else:
        logging.info(message, *args)


def progress(total: int, initial: int, description: str) -> "tqdm.tqdm":
    """A progress bar of steps (disabled unless :func:`setup` was called)."""
    return tqdm.tqdm(total=total, initial=initial, desc=description, unit="step",
                     disable=not logs.Settings.enabled, dynamic_ncols=True, leave=True,
                     mininterval=1.0 if sys.stderr.isatty() else 30.0, file=sys.stderr)
