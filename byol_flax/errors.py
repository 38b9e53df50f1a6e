"""The one base class of every error that is the user's to fix (a config key, a file, a path, a
flag value) rather than a bug: the commands print such an error as one line naming what is wrong
(:func:`byol_flax.runtime.commands.run_command`), the full traceback goes to the log file only.

Each module keeps its own specific error (``ConfigError``, ``DataError``, ``SourceError``...),
declared as ``class XError(UserError, <builtin base>)`` so callers can still catch the builtin
(``ValueError``, ``OSError``) it always was.
"""


class UserError(Exception):
    """Something the user gave (config, data, checkpoint, export, path, flag) is wrong; the
    message names it and says what to do."""
