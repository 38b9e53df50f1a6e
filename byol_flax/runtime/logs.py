"""Where log records go: the full log in a file, the console for people.

:func:`setup` (called by the commands that write a workdir: ``byol_flax.main``, the demo and the
study runner) sends every log record, from this package and from the libraries (Orbax, Grain,
CLU's scalar and parameter tables), to ``<workdir>/log.txt`` (on ``gs://``: segments of it,
:mod:`byol_flax.storage.append_log`, so the log survives the VM) and leaves on the console
only warnings, errors and the stage lines of :mod:`byol_flax.runtime.console`. ``verbose=True`` puts
everything back on the console as well. A command without a workdir logs to
``<tempdir>/byol_flax_logs/<command>.log`` (:func:`temporary_log_file`). The log file is opened
by the storage layer: a link, FIFO or directory at its path is refused, never appended to.

Library use (tests, notebooks) without :func:`setup` leaves logging as the caller configured it.
"""

import logging
import os
import re
import sys
import tempfile
from collections.abc import Callable
from typing import IO

from etils import epath

from byol_flax.storage import append_log, files

LOG_FILE = "log.txt"
STAGE_LOGGER = logging.getLogger("byol_flax.stage")
FORMAT = "%(asctime)s %(levelname)s %(name)s %(filename)s:%(lineno)d] %(message)s"
TEMPORARY_LOG_DIR = "byol_flax_logs"


class Settings:
    """The process's logging set-up (one per process: a command runs once)."""

    enabled = False  # setup() was called: show stage lines and progress bars
    file_handler: "LogFileHandler | None" = None
    command = "byol_flax"  # names the temporary log file (run_command sets it)


class _NotStage(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.name != STAGE_LOGGER.name


class _NotLibraryNoise(logging.Filter):
    """Console only, without --verbose: Orbax's own error reports and asyncio's "exception was
    never retrieved" blocks. Every failure of a save reaches the console as the one-line
    CheckpointWriteError (byol_flax.checkpointing); the full reports stay in the log file."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "asyncio" and "never retrieved" in str(record.msg):
            return False
        return f"{os.sep}orbax{os.sep}" not in record.pathname


def _is_closed_loop_noise(kind: type, value: BaseException) -> bool:
    return issubclass(kind, RuntimeError) and "Event loop is closed" in str(value)


def _without_closed_loop_noise(previous):
    """A ``sys.unraisablehook`` that sends asyncio's "Event loop is closed" errors to the log
    file: TensorStore's callbacks raise them in bulk once a failed asynchronous save has shut
    its event loop down, while the run reports the failure itself in one line."""
    def hook(unraisable) -> None:
        if _is_closed_loop_noise(unraisable.exc_type, unraisable.exc_value):
            logging.info("after a failed asynchronous save", exc_info=(
                unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback))
            return
        previous(unraisable)

    hook.filters_closed_loop_noise = True
    return hook


def quiet_native_logs() -> None:
    """TensorFlow's C++ start-up notices; must run before TensorFlow is imported (only the
    TFDS converter imports it, through tensorflow_datasets, to read records). Its oneDNN
    kernels (whose notice TF_CPP_MIN_LOG_LEVEL does not silence) are not needed there. Set in
    the environment, so worker processes inherit it; a user's own values win."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def temporary_log_file(command: str | None = None) -> epath.Path:
    """The log file of a command that has no workdir (or failed before it had one)."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", command or Settings.command)
    return epath.Path(tempfile.gettempdir()) / TEMPORARY_LOG_DIR / f"{name}.log"


class LogFileHandler(logging.StreamHandler):
    """Log records to the log file at ``path`` (local or ``gs://``), opened by the storage
    layer: a link, FIFO or directory planted at a local path is refused, never appended to; on
    ``gs://`` the log is written as segments. ``delay``: opened by the first record."""

    def __init__(self, path: str, *, truncate: bool = False, delay: bool = False):
        logging.Handler.__init__(self)
        self.path = path
        self._truncate = truncate
        self.upload_guard: Callable[[], None] | None = None  # see guard_log_file
        self.stream: IO | append_log.SegmentWriter | None = None if delay else self._open()

    def _open(self) -> IO | append_log.SegmentWriter:
        return append_log.open_log(self.path, truncate=self._truncate, what="log file",
                                   guard=self._check_upload, compact=False)  # every process

    def _check_upload(self) -> None:
        if self.upload_guard is not None:
            self.upload_guard()

    def emit(self, record: logging.LogRecord) -> None:
        if self.stream is None:
            self.stream = self._open()
        super().emit(record)

    def close(self) -> None:
        with self.lock:
            try:
                if self.stream is not None:
                    self.stream.close()
            finally:
                self.stream = None
                logging.Handler.close(self)


def _route_logs(path: epath.Path, *, verbose: bool, delay: bool = False) -> None:
    """Every log record to ``path``; only warnings and errors (everything with ``verbose``) to
    the console. ``delay``: the file is created by its first record only."""
    root = logging.getLogger()
    if Settings.file_handler is not None:
        root.removeHandler(Settings.file_handler)
        Settings.file_handler.close()
    file_handler = LogFileHandler(os.fspath(path), truncate=delay, delay=delay)
    file_handler.setFormatter(logging.Formatter(FORMAT))
    file_handler.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.addHandler(file_handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    Settings.file_handler = file_handler
    for handler in root.handlers:  # absl's stderr handler (app.run installs it) and others
        if handler is not file_handler:
            handler.setLevel(logging.NOTSET if verbose else logging.WARNING)
            if not any(isinstance(f, _NotStage) for f in handler.filters):
                handler.addFilter(_NotStage())  # stage lines have their own console handler
            for noise in [f for f in handler.filters if isinstance(f, _NotLibraryNoise)]:
                handler.removeFilter(noise)
            if not verbose:
                handler.addFilter(_NotLibraryNoise())
    logging.captureWarnings(True)  # Python warnings go through the same handlers
    if not verbose and not getattr(sys.unraisablehook, "filters_closed_loop_noise", False):
        sys.unraisablehook = _without_closed_loop_noise(sys.unraisablehook)


class _CheckFirst(logging.Filter):
    def __init__(self, check: Callable[[], None]):
        super().__init__()
        self.check = check

    def filter(self, record: logging.LogRecord) -> bool:
        self.check()
        return True


def guard_log_file(check: Callable[[], None]) -> Callable[[], None]:
    """Runs ``check`` before every record is written to the log file, which may stop the
    process (the workdir lease's fence: a run whose workdir was taken over writes no line into
    it); on ``gs://`` before every upload of a segment instead (one lease read per segment, not
    per line). Returns the function that removes the guard."""
    handler = Settings.file_handler
    if handler is None:
        return lambda: None
    if files.is_remote(handler.path):
        handler.upload_guard = check
        return lambda: setattr(handler, "upload_guard", None)
    guard = _CheckFirst(check)
    handler.addFilter(guard)
    return lambda: handler.removeFilter(guard)


def setup(workdir: epath.PathLike, *, verbose: bool = False) -> epath.Path:
    """Routes logging to ``workdir/log.txt`` and quiets the console; returns the log file."""
    path = epath.Path(workdir) / LOG_FILE
    if not files.is_remote(path):
        path.parent.mkdir(parents=True, exist_ok=True)
    _route_logs(path, verbose=verbose)
    if not STAGE_LOGGER.handlers:
        console = logging.StreamHandler(sys.stderr)  # beside the progress bars; stdout: results
        console.setFormatter(logging.Formatter("%(message)s"))
        STAGE_LOGGER.addHandler(console)
    STAGE_LOGGER.setLevel(logging.INFO)
    Settings.enabled = True
    return path


def close() -> None:
    """Closes the log file before the process winds down: on ``gs://`` its last segment is
    uploaded while the storage clients still run (at interpreter exit, gcsfs has closed its
    sessions before ``logging`` closes its handlers)."""
    handler = Settings.file_handler
    if handler is not None:
        logging.getLogger().removeHandler(handler)
        Settings.file_handler = None
        handler.close()


def log_to_temporary_file() -> None:
    """A command without a workdir (export, import) logs to :func:`temporary_log_file`, created
    by its first record; a command with one replaces it by ``<workdir>/log.txt`` (:func:`setup`)
    before anything is logged."""
    path = temporary_log_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError:  # no writable temporary directory: the console keeps the log
        return
    _route_logs(path, verbose=False, delay=True)
