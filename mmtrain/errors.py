"""Errors shared across the package."""


class UserError(Exception):
    """An error the user must act on (bad spec, missing file, too many rejects).

    The CLI prints it as one line naming the file / row / sample at fault and exits with status 2, no traceback.
    """
