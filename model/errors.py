"""Errors every command line of the project shares (one layer below every CLI module)."""


class CLIError(Exception):
    """An expected failure: printed as one line, exit status 2."""
