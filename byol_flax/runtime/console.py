"""What the entry points print: the console is for people, the full log goes to a file.

:func:`setup` (called by ``byol_flax.main`` and ``byol_flax.studies.demo``) sends every log record, from
this package and from the libraries (Orbax, Grain, CLU's scalar and parameter tables), to
``<workdir>/log.txt`` and leaves on the console only warnings, errors, one line per stage
(:func:`stage`) and a progress bar per pre-training (:func:`progress`). ``verbose=True`` puts
everything back on the console as well.

Library use (tests, notebooks) without :func:`setup` prints no progress bar and leaves logging
as the caller configured it.
"""

import logging
import os
import sys
import tempfile
from collections.abc import Callable
from typing import Any, NoReturn

import tqdm
from absl import app, flags
from etils import epath

from byol_flax import configs

LOG_FILE = "log.txt"
_STAGE_LOGGER = logging.getLogger("byol_flax.stage")
_FORMAT = "%(asctime)s %(levelname)s %(name)s %(filename)s:%(lineno)d] %(message)s"


class _Settings:
    enabled = False  # setup() was called: show stage lines and progress bars
    file_handler: logging.Handler | None = None


class _NotStage(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.name != _STAGE_LOGGER.name


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
    """TensorFlow's C++ start-up notices; must run before TensorFlow is imported (CLU's writers
    import it). TensorFlow only writes summaries here, so its oneDNN kernels (whose notice
    TF_CPP_MIN_LOG_LEVEL does not silence) are not needed. Set in the environment, so worker
    processes inherit it; a user's own values win."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def local_log_dir(workdir: str) -> epath.Path:
    """Where the log file of ``workdir`` goes: the workdir itself, or for a ``gs://`` workdir a
    local directory named after it (a log file is appended to line by line)."""
    if "://" not in workdir:
        return epath.Path(workdir)
    return epath.Path(tempfile.gettempdir()) / "byol_flax_logs" / workdir.split("://", 1)[1]


def setup(workdir: epath.PathLike, *, verbose: bool = False) -> epath.Path:
    """Routes logging to ``workdir/log.txt`` and quiets the console; returns the log file."""
    path = epath.Path(workdir) / LOG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    if _Settings.file_handler is not None:
        root.removeHandler(_Settings.file_handler)
    file_handler = logging.FileHandler(os.fspath(path), encoding="utf-8")
    file_handler.setFormatter(logging.Formatter(_FORMAT))
    file_handler.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.addHandler(file_handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    _Settings.file_handler = file_handler
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
    if not _STAGE_LOGGER.handlers:
        console = logging.StreamHandler(sys.stderr)  # beside the progress bars; stdout: results
        console.setFormatter(logging.Formatter("%(message)s"))
        _STAGE_LOGGER.addHandler(console)
    _STAGE_LOGGER.setLevel(logging.INFO)
    _Settings.enabled = True
    return path


def exit_with_error(line: str) -> NoReturn:
    """Ends the process with one line on the console and status 1. What libraries still print
    while the process winds down (e.g. background threads of a failed asynchronous save) goes to
    the log file instead of burying that line."""
    print(line, file=sys.stderr, flush=True)
    if _Settings.file_handler is not None:  # the log file records it too (console: once)
        _Settings.file_handler.handle(logging.LogRecord(
            "byol_flax", logging.ERROR, __file__, 0, line, None, None))
        try:
            descriptor = os.open(_Settings.file_handler.baseFilename,
                                 os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            os.dup2(descriptor, sys.stderr.fileno())
        except (OSError, ValueError, AttributeError):  # no file descriptor (captured stderr)
            pass
    sys.exit(1)


def stage(message: str, *args: Any) -> None:
    """One line a person reads on the console (and in the log file)."""
    if _Settings.enabled:
        _STAGE_LOGGER.info(message, *args)
    else:
        logging.info(message, *args)


def progress(total: int, initial: int, description: str) -> "tqdm.tqdm":
    """A progress bar of steps (disabled unless :func:`setup` was called)."""
    return tqdm.tqdm(total=total, initial=initial, desc=description, unit="step",
                     disable=not _Settings.enabled, dynamic_ncols=True, leave=True,
                     mininterval=1.0 if sys.stderr.isatty() else 30.0, file=sys.stderr)


def run_command(main: Callable[[list[str]], None], module_name: str, *,
                config_flag: str | None = None) -> None:
    """Runs an absl command (``python -m MODULE`` or its console script).

    ``--help`` shows ``module_name``'s docstring and flags also when the command starts through
    an installed console script (absl shows those of ``__main__``, pip's wrapper there).
    ``config_flag``: the flag naming a config module, resolved from a shipped config's name
    (``--config=digits_cpu:...``, :func:`byol_flax.configs.resolve_flag`) before absl parses it;
    an unknown name is one error line.
    """
    sys.modules["__main__"].__doc__ = sys.modules[module_name].__doc__
    for flag in flags.FLAGS.get_key_flags_for_module(module_name):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)

    def parse(argv: list[str]) -> list[str]:
        if config_flag:
            try:
                argv = configs.resolve_flag(argv, config_flag)
            except configs.UnknownConfigError as error:
                sys.exit(f"error: --{config_flag}: {error}")
        return app.parse_flags_with_usage(argv)

    app.run(main, flags_parser=parse)
