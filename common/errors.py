"""One exception hierarchy for zps, grouped by cause.

    ZPSError
    ├── ConfigError          bad setting or argument (also a ValueError)
    ├── ProtocolError        a message that does not follow docs/PROTOCOL.md
    │   └── PlanMismatchError  the peer uses another partition plan
    ├── RemoteError          the peer answered with a typed error reply
    │   └── StalenessTimeoutError  a parked read passed its deadline
    ├── DeadlineExceeded     no answer within the caller's deadline
    └── ClosedError          the component was shut down by its owner

Every error that crosses the wire has an :class:`ErrorCode`; the codes are
part of the protocol (see ``common.protocol``).
"""
from __future__ import annotations

import enum


class ErrorCode(enum.IntEnum):
    """Error codes carried by ERROR replies (frame 0, key ``code``)."""

    MALFORMED = 1          # undecodable header, wrong frame count or size
    BAD_VERSION = 2        # protocol version not supported
    UNKNOWN_TYPE = 3       # message type not known
    PLAN_MISMATCH = 4      # plan hash differs from the server's
    NOT_INITIALIZED = 5    # server has no weights yet
    NONFINITE = 6          # gradient holds NaN or infinity
    STALE_TIMEOUT = 7      # parked read passed its deadline
    BAD_CLOCK = 8          # clock out of the range the mode accepts
    FENCED = 9             # message for an old incarnation
    NO_PLAN = 10           # request needs a plan; send HELLO first
    OVERLOADED = 11        # a bounded queue is full
    SHUTTING_DOWN = 12     # server is stopping
    INTERNAL = 13          # unexpected server failure (logged server side)
    UNREACHABLE = 14       # coordinator cannot reach the endpoint a server advertised


class ZPSError(Exception):
    """Base of every error zps raises on purpose."""


class ConfigError(ZPSError, ValueError):
    """A setting or argument has a value zps cannot use."""


class ProtocolError(ZPSError):
    """A message breaks the wire contract."""

    code = ErrorCode.MALFORMED

    def __init__(self, message: str, code: ErrorCode | None = None, detail: dict | None = None):
        super().__init__(message)
        if code is not None:
            self.code = ErrorCode(code)
        #: machine-readable detail, sent in the ERROR reply's ``detail`` when not empty
        self.detail = dict(detail or {})


class PlanMismatchError(ProtocolError):
    """The peer's partition plan hash differs from ours."""

    code = ErrorCode.PLAN_MISMATCH


class RemoteError(ZPSError):
    """The server answered a request with an ERROR reply."""

    def __init__(self, code: int, message: str, server: str = "", detail: dict | None = None):
        try:
            self.code = ErrorCode(code)
        except ValueError:
            self.code = code
        self.server = server
        self.detail = dict(detail or {})
        name = self.code.name if isinstance(self.code, ErrorCode) else str(code)
        where = f" from {server}" if server else ""
        super().__init__(f"{name}{where}: {message}")


class StalenessTimeoutError(RemoteError):
    """A read could not be served within its deadline.

    ``blockers`` lists the worker ids whose clocks hold the read back.
    """

    @property
    def blockers(self) -> list[int]:
        return list(self.detail.get("blockers", []))


class DeadlineExceeded(ZPSError, TimeoutError):
    """A blocking call ran out of time with no answer."""


class ClosedError(ZPSError):
    """The component was closed by its owner."""


class JobStopped(ZPSError):
    """The job ended (``ps-ctl shutdown``) before this worker finished its steps."""


#: Exit status of a ``ps-worker`` whose job was shut down before it finished.
EXIT_JOB_STOPPED = 3


def remote_error(code: int, message: str, server: str = "", detail: dict | None = None) -> RemoteError:
    """Build the most specific :class:`RemoteError` for an ERROR reply."""
    cls = StalenessTimeoutError if code == ErrorCode.STALE_TIMEOUT else RemoteError
    return cls(code, message, server, detail)
