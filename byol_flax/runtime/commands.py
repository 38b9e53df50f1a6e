"""How every command starts and ends: absl flags, ``--help``, and one line per user error.

Every command is an absl app started by :func:`run_command` (absl flags throughout:
ml_collections' ``--config=NAME`` / ``--config.key=value`` exist only as absl flags). Its
``--help`` is the command's docstring and its own flags. Errors: a
:class:`~byol_flax.errors.UserError`, an ``OSError`` or a flag the command cannot parse is one
line, ``error: <Type>: <message>`` (newlines and control characters escaped), exit status 1 (2
for a flag or argument), and its traceback goes to the log file
(:mod:`byol_flax.runtime.logs`). Any other exception is a bug and keeps its traceback.

Why absl, not argparse: ml_collections' ``config_flags`` (``--config=NAME``,
``--config.key=value``) exist only as absl flags, and the JAX research codebases (flax examples,
big_vision, MaxText) use absl: one convention. A command that other code imports (the study
runner, the launcher, the converters) keeps its flags on its own ``flags.FlagValues``
(``COMMAND_FLAGS``, passed as ``flag_values=``), so importing it defines no global flag, and its
``main(argv)`` also runs in-process.
"""

import logging
import os
import re
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import NoReturn

from absl import app, flags

from byol_flax.errors import UserError
from byol_flax.runtime import config_names, logs
from byol_flax.storage import files

USAGE_STATUS = 2  # a flag or argument the command cannot use


class CommandLineError(UserError, ValueError):
    """A flag or argument value the command cannot use: one line, exit status 2."""


def one_line(text: str) -> str:
    """``text`` with newlines and other control characters escaped (``\\n``, ``\\x1b``) and
    undecodable bytes of file names shown as escapes: an error stays one line on the console."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


def error_line(error: BaseException) -> str:
    """``error: <Type>: <message>`` in one line."""
    return one_line(f"error: {type(error).__name__}: {error}")


def report_error(line: str, error: BaseException | None = None, *,
                 command: str | None = None) -> str:
    """Prints ``line`` (made one line) on the console and writes it, with ``error``'s
    traceback, to the log file (when :func:`~byol_flax.runtime.logs.setup` did not run: the
    :func:`~byol_flax.runtime.logs.temporary_log_file`
    of ``command``, by default the running command's); returns the printed line."""
    line = one_line(line)
    print(line, file=sys.stderr, flush=True)
    record = logging.LogRecord("byol_flax", logging.ERROR, __file__, 0, line, None,
                               (type(error), error, error.__traceback__) if error else None)
    handler = logs.Settings.file_handler
    try:
        if handler is None:
            path = logs.temporary_log_file(command)
            path.parent.mkdir(parents=True, exist_ok=True)
            with files.open_append(path, truncate=True, what="log file") as file:  # the last run's
                file.write(logging.Formatter(logs.FORMAT).format(record) + "\n")
        else:
            handler.handle(record)  # the log file only (the console has it once)
    except OSError:  # the log cannot be written: the console line is what there is
        pass
    return line


def exit_with_error(line: str, *, error: BaseException | None = None,
                    status: int = 1) -> NoReturn:
    """Ends the process with one line on the console (``error``'s traceback to the log file,
    :func:`report_error`) and ``status``. What libraries still print while the process winds
    down (e.g. background threads of a failed asynchronous save) goes to the log file instead of
    burying that line."""
    report_error(line, error)
    handler = logs.Settings.file_handler
    if handler is not None and not files.is_remote(handler.path):  # an object has no descriptor
        try:
            with files.open_append(handler.path, what="log file") as log:
                os.dup2(log.fileno(), sys.stderr.fileno())
        except (OSError, ValueError, AttributeError):  # no file descriptor (captured stderr)
            pass
    sys.exit(status)


def _exit_status(error: BaseException) -> int:
    return USAGE_STATUS if isinstance(error, (CommandLineError, app.UsageError)) else 1


def run_command(main: Callable[[list[str]], int | None], module_name: str, *,
                config_flag: str | None = None, flag_values: flags.FlagValues | None = None,
                argv: Sequence[str] | None = None, doc: str | None = None) -> int:
    """Runs an absl command (``python -m MODULE`` or its console script).

    ``--help`` shows ``doc`` (by default ``module_name``'s docstring) and the command's own flags
    also when the command starts through an installed console script (absl shows those of
    ``__main__``, pip's wrapper there). Flags: the ones ``module_name`` defines on absl's global
    ``FLAGS`` or, with ``flag_values``, the command's own :class:`absl.flags.FlagValues` (a
    module that other code imports keeps its flags there: importing it defines no global flag,
    and two commands may share a flag name). ``config_flag``: the flag naming a config module,
    resolved from a shipped config's name (``--config=digits_cpu:...``,
    :func:`byol_flax.runtime.config_names.resolve_flag`) before absl parses it.

    A flag absl or the config cannot take (an unknown override key, a value of the wrong type, a
    bad config argument or file) is one line naming it, status 2; a :class:`UserError` or an
    ``OSError`` raised by ``main`` is one line, status 1 (2 for a :class:`CommandLineError` or
    an :class:`absl.app.UsageError`). Logs go to
    :func:`~byol_flax.runtime.logs.temporary_log_file` until ``main`` calls
    :func:`~byol_flax.runtime.logs.setup`.

    ``argv`` (the arguments after the program name, with ``flag_values`` only): runs the command
    in this process instead (a test, a study preparing its data) and returns its exit status,
    with the same one-line errors, without exiting or touching absl's global flags or the
    logging set-up.
    """
    module = sys.modules[module_name]
    command = getattr(module.__spec__, "name", None) or module_name  # python -m: not __main__
    command = command.removesuffix(".__main__")
    if argv is not None:
        if flag_values is None:
            raise ValueError("run_command(argv=...) needs the command's own flag_values")
        return _run_in_process(main, command, flag_values, argv)
    logs.Settings.command = command
    sys.modules["__main__"].__doc__ = module.__doc__ if doc is None else doc
    own_flags = (flags.FLAGS.get_key_flags_for_module(module_name) if flag_values is None
                 else _add_to_global_flags(flag_values))
    for flag in own_flags:
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)

    def parse(argv: list[str]) -> list[str]:
        try:
            if config_flag:
                argv = config_names.resolve_flag(argv, config_flag)
            rest = flags.FLAGS(argv)
            if flag_values is not None:
                flag_values.mark_as_parsed()  # the same flags: the command's holders read them
            if config_flag:
                _check_config_loaded(config_flag)
            return rest
        except Exception as error:
            message = _flag_error_message(error, config_flag)
            if message is None:
                raise
            exit_with_error(f"error: {message}", error=error, status=USAGE_STATUS)

    def guarded_main(argv: list[str]) -> int | None:
        logs.log_to_temporary_file()
        try:
            return main(argv)
        except (app.UsageError, UserError, OSError) as error:
            exit_with_error(_main_error_line(error), error=error, status=_exit_status(error))
        finally:
            logs.close()

    app.run(guarded_main, flags_parser=parse)
    return 0  # not reached: app.run exits


def _add_to_global_flags(flag_values: flags.FlagValues) -> list[flags.Flag]:
    """Puts the command's own flags (the same objects) into absl's global ``FLAGS``, which
    ``app.run`` parses and ``--help`` lists; returns them."""
    own = [flag_values[name] for name in flag_values if flag_values[name].name == name]
    for flag in own:
        if flag.name not in flags.FLAGS or flags.FLAGS[flag.name] is not flag:
            flags.FLAGS[flag.name] = flag  # another flag of that name: DuplicateFlagError
    return own


def _run_in_process(main: Callable[[list[str]], int | None], command: str,
                    flag_values: flags.FlagValues, argv: Sequence[str]) -> int:
    """:func:`run_command` with ``argv``: parses into ``flag_values`` alone; the exit status."""
    if flag_values.is_parsed():
        flag_values.unparse_flags()  # an earlier call's values
    try:
        rest = flag_values([command, *argv])
    except flags.Error as error:
        report_error(f"error: {_flag_error_message(error, None)}", error, command=command)
        return USAGE_STATUS
    try:
        return main(rest) or 0
    except (app.UsageError, UserError, OSError) as error:
        report_error(_main_error_line(error), error, command=command)
        return _exit_status(error)


def _main_error_line(error: BaseException) -> str:
    if isinstance(error, app.UsageError):
        return f"error: {error} (--helpshort lists the flags)"
    return error_line(error)


def _check_config_loaded(config_flag: str) -> None:
    """ml_collections keeps a config file that failed to load as a placeholder raising its
    ``OSError`` when first used; use it here, so that the error is one about the flag."""
    value = flags.FLAGS[config_flag].value
    if value is not None:
        getattr(value, "lock", None)


def _exception_chain(error: BaseException) -> list[BaseException]:
    """``error`` and the exceptions it was raised from or while handling, outermost first."""
    chain: list[BaseException] = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def _flag_error_message(error: Exception, config_flag: str | None) -> str | None:
    """The one-line message of an error raised while the flags were parsed, or None for a bug
    (an exception of a config module's ``get_config`` that is not a :class:`UserError`)."""
    chain = _exception_chain(error)
    users = [e for e in chain if isinstance(e, UserError)]
    if users:  # e.g. a config argument: ml_collections and absl wrap it twice; name the cause
        return f"{type(users[-1]).__name__}: {users[-1]}"
    if any(str(e).startswith("Error whilst parsing config file") for e in chain):
        return None  # ml_collections' wrapper of an error of get_config: a bug
    if isinstance(error, flags.Error):
        return f"{error} (--helpshort lists the flags)"
    if isinstance(error, OSError):
        return f"{type(error).__name__}: {error}"
    if config_flag:
        return _override_error_message(error, config_flag)
    return None


def _override_error_message(error: Exception, config_flag: str) -> str | None:
    """``--config.KEY=...`` naming a key the config does not have: ml_collections raises
    ``AttributeError``/``KeyError``/``IndexError`` (or ``ValueError`` for a path it cannot read)
    from its ``config_path`` module, outside absl's error type. None for anything else."""
    frames = [frame for frame, _ in traceback.walk_tb(error.__traceback__)]
    if not any(f.f_code.co_filename.endswith(os.path.join("config_flags", "config_path.py"))
               for f in frames):
        return None
    paths = [f.f_locals.get("field_path") or f.f_locals.get("override") for f in frames
             if f.f_code.co_filename.endswith(os.path.join("config_flags", "config_flags.py"))]
    path = next((p for p in paths if isinstance(p, str)), None)
    flag = f"--{config_flag}.{path}" if path else f"a --{config_flag}.KEY override"
    if isinstance(error, (AttributeError, KeyError, IndexError)):
        suggestion = re.search(r'Did you mean "([^"]+)"', str(error))
        return (f"{flag}: no such key in the config"
                + (f" (did you mean {suggestion.group(1)!r}?)" if suggestion else ""))
    if isinstance(error, (ValueError, TypeError)):
        return f"{flag}: {error}"
    return None
