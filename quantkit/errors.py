"""Exceptions shown to users as one line, without a traceback."""


class QuantkitError(Exception):
    """A failure the user can act on: bad input, missing files, unsupported settings."""


class NumericalError(QuantkitError):
    """The solver could not produce finite results (e.g. a Hessian that stays singular)."""


class CalibrationError(QuantkitError):
    """The calibration set cannot be read or holds too few tokens."""
