"""Errors that the command line turns into exit code 2 with one clear message."""


class UserInputError(ValueError):
    """Bad input from the user (model spec, strategy, file, shape): exit code 2, no traceback."""
