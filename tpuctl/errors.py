"""Domain errors and the exit codes tpuctl documents.

Library code raises `TpuctlError` with the offending values in the message and, where there is one, a fix;
the CLI prints it as one line (a traceback only with -v).
"""

from __future__ import annotations

# Exit codes, the one list (README's table and `tpuctl --help` show EXIT_CODES).
EXIT_OK = 0
EXIT_FAILED = 1  # the command ran but something failed: some workers (named), `check`: busy chips, `status`: a trainer
EXIT_USAGE = 2  # bad input, configuration or an API refusal: nothing was done
EXIT_UNKNOWN = 3  # `check` / `status`: some worker's state is unknown (unreachable): never taken for free or running
EXIT_GAVE_UP = 4  # `babysit`: the run is not finished after --max-restarts restarts
EXIT_UNREACHABLE = 255  # `exec`: a worker could not be reached or timed out (ssh's own convention)
EXIT_CODES = {
    EXIT_OK: "done; check: all chips free; status: every trainer running or done",
    EXIT_FAILED: "something failed (named last on stderr); check: some chips busy; status: a trainer failed or died",
    EXIT_USAGE: "bad input, configuration or API error: one line on stderr, nothing done",
    EXIT_UNKNOWN: "check / status: some worker unknown (unreachable), which is never counted as free",
    EXIT_GAVE_UP: "babysit: gave up after --max-restarts restarts",
    EXIT_UNREACHABLE: "exec: some worker unreachable or timed out (else exec exits with the worst worker's status)",
}


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


class GaveUpError(TpuctlError):
    """babysit's restarts are used up and the run is not finished."""

    exit_code = EXIT_GAVE_UP


class HostKeyChangedError(TpuctlError):
    """A worker presented a host key different from the one tpuctl recorded."""


class ProxyError(TpuctlError):
    """The jump host (ssh_proxy) could not be reached, or could not reach a worker."""
