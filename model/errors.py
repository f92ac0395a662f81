"""Errors every command line of the project shares (one layer below every CLI module).

An expected failure (bad input: a flag, a setting, a file, data) is a :class:`CLIError` or an
:class:`InputError`; the command lines print it as one line and exit 2. Any other exception is a
bug and ends with a traceback. The project's typed input errors (``ConfigError``,
``SchemaError``, ``DataError``, ``OverridesError``, ``RunFolderError``, ``MetaError``,
``RepositoryError``, ``ExportError``) are InputErrors."""


class CLIError(Exception):
    """An expected failure: printed as one line, exit status 2."""


class InputError(ValueError):
    """Bad input: a setting out of range, a file or data that cannot be used (the message names
    it and the reason). A ValueError, so callers that catch ValueError still do."""


def one_line(e: BaseException | str, limit: int | None = 300) -> str:
    """An error's text on one line (whitespace runs collapsed), cut to ``limit`` characters
    (None: uncut) for messages that quote a library's error."""
    text = " ".join(str(e).split())
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."
