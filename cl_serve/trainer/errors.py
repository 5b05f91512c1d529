"""Errors the trainer raises for input a user can fix (the CLI turns them into one line and exit code 2): user
errors (cl_serve.base.errors.UserError) that are also ValueErrors, as the trainer's callers expect."""
from cl_serve.base.errors import UserError


class DataError(UserError, ValueError):
    """The task data cannot be used as given; the message says what to fix."""


class BackboneError(UserError, ValueError):
    """The backbone specification or checkpoint cannot be used."""
