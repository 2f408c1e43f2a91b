"""Exceptions shown to users as one line, without a traceback."""


class QuantkitError(Exception):
    """A failure the user can act on: bad input, missing files, unsupported settings."""


class NumericalError(QuantkitError):
    """The solver could not produce finite results (e.g. a Hessian that stays singular). solve: which solve of a
    batch (gptq.gptq_quantize_batched) failed, None for a single solve."""

    def __init__(self, message: str, solve: int | None = None) -> None:
        super().__init__(message)
        self.solve = solve


class CalibrationError(QuantkitError):
    """The calibration set cannot be read or holds too few tokens."""


def first_line(e: BaseException) -> str:
    """An error's message as one line: its first line, or its type's name when it has no message."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
