"""Errors a user can fix by changing their input."""


class LoSparseUsageError(ValueError):
    """A bad user-supplied value.  The message names the value and what is allowed.

    Entry scripts print it as one line and exit non-zero, before any model is loaded.
    """
