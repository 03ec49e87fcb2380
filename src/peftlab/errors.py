"""The one error type users see: a single line saying what is wrong, where, and how to fix it."""


class UserError(Exception):
    """Bad input from the user. The CLI prints it as one line and exits with code 2."""
