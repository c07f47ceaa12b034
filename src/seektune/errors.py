"""Errors a user can cause.

A `UserError` carries one line that says what is wrong and what to do about it. The CLI prints that
line alone and exits with code 2; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem in the user's input (config, paths, data, environment) rather than in seektune."""

    exit_code = 2
