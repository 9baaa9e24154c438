"""Errors that reach the user as one ``error:`` line and exit code 2.

Library code raises :class:`UserError` (or a subclass) for anything the user can fix: a bad spec, a
missing file, a shape the model rejects. The CLI turns it into ``error: <message>`` on stderr.
Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit code 2."""


class SpecError(UserError):
    """A model, data, defense or attack spec that cannot be parsed or resolved."""


class DataError(UserError):
    """Data that is missing, empty, corrupt or of the wrong shape or range."""


class ModelError(UserError):
    """A model that cannot be built, loaded, or run on the data."""
