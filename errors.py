"""The one exception for bad input."""


class UserError(Exception):
    """Bad input. Scripts print it as one line on stderr and exit with status 2 (cli.main_guard)."""
