"""The one exception type for user mistakes: the CLI prints its message on one line and exits 2."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (libraries raise multi-line ones), for a one-line error."""
    lines = str(e).strip().splitlines()
    return lines[0][:200] if lines else type(e).__name__


class UserError(Exception):
    """Bad input (config, file, row, version) that the user can fix. The message names the place."""

    exit_code = 2
