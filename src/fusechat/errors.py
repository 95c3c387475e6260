"""The one exception type for user mistakes: the CLI prints its message on one line and exits 2."""


class UserError(Exception):
    """Bad input (config, file, row, version) that the user can fix. The message names the place."""

    exit_code = 2
