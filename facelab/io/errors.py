"""Errors raised on bad user input."""


class InputError(ValueError):
    """A user-supplied file, folder or value is unusable; the message names it and says why."""
