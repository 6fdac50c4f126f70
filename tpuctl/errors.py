"""Domain errors and the exit codes tpuctl documents.

Library code raises `TpuctlError` with the offending values in the message and, where there is one, a fix;
the CLI prints it as one line (a traceback only with -v).
"""

from __future__ import annotations

# Exit codes (also listed in the README).
EXIT_OK = 0
EXIT_FAILED = 1  # the command ran but some workers failed (or `check`: some chips are busy)
EXIT_USAGE = 2  # bad input, configuration or API error: nothing was done (`check`: some worker unknown)
EXIT_UNREACHABLE = 255  # `exec`: a worker could not be reached or timed out (ssh's own convention)


class TpuctlError(Exception):
    """A user-facing error: one line saying what is wrong, and optionally how to fix it."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class ConfigError(TpuctlError):
    """A setting is missing or invalid."""


class CloudError(TpuctlError):
    """The Cloud TPU API refused or failed a call."""

    retryable = False  # no capacity or quota right now: asking again later may work


class HostKeyChangedError(TpuctlError):
    """A worker presented a host key different from the one tpuctl recorded."""
