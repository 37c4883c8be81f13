"""One error hierarchy for the whole tool; the CLI maps each family to an exit code.

Exit codes (contract): 0 done, 1 done but different from --expect, 2 bad usage or
configuration, 3 could not complete.
"""

from __future__ import annotations

from typing import Any


class UdpreachError(Exception):
    """Base class: every error the CLI turns into a one-line message."""

    exit_code = 3


class ConfigError(UdpreachError):
    """Bad usage or configuration: a malformed spec, a loose secret file, a bad policy."""

    exit_code = 2


class PortSpecError(ConfigError):
    """A port SPEC that cannot be parsed or is out of range."""


class ProtocolError(UdpreachError):
    """The peer broke the control protocol (bad framing, unexpected message)."""


class AuthError(UdpreachError):
    """Authentication refused: the peer does not know the secret."""


class UnreachableError(UdpreachError):
    """The coordinator could not be reached or stopped answering."""


class ConnectionLostError(UnreachableError):
    """The coordinator went away during a run: it was reached, so its address is not why."""


class AgentUnavailableError(UdpreachError):
    """The named agent is not registered, or was lost during the run."""


def leaves(group: BaseExceptionGroup[Any]) -> list[BaseException]:
    """The exceptions of ``group`` and of its nested groups, depth first, in order."""
    out: list[BaseException] = []
    todo: list[BaseException] = [group]
    while todo:
        exc = todo.pop(0)
        if isinstance(exc, BaseExceptionGroup):
            todo[:0] = exc.exceptions
        else:
            out.append(exc)
    return out
