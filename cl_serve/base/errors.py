"""Errors a user can act on: the CLI prints their message on one line and exits with code 2."""


class UserError(Exception):
    """Bad input or state the user can fix; the message says how."""


class StoreError(UserError):
    """The model store is missing, broken, locked or asked for something it does not hold."""
