"""Errors the trainer raises for input a user can fix (the CLI turns them into one line and exit code 2)."""


class DataError(ValueError):
    """The task data cannot be used as given; the message says what to fix."""


class BackboneError(ValueError):
    """The backbone specification or checkpoint cannot be used."""
