"""The exceptions pacs-bridge raises, each telling the operator what went wrong and what to do.

Library exceptions (SQLAlchemy, httpx, pydicom) are wrapped where they enter our code, with the
original kept as ``__cause__``. No message carries a password: a URL in one is shown without it
(``pacs_bridge.redaction``).
"""

from __future__ import annotations

import errno
from collections.abc import Sequence

from pacs_bridge.redaction import redact_urls


class PacsBridgeError(Exception):
    """pacs-bridge failed; the message says why."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(redact_urls(message or (self.__doc__ or "").strip()))


class ConfigError(PacsBridgeError):
    """The configuration file is invalid; fix every problem listed and run ``pacs-bridge check-config``."""

    def __init__(self, path: str, problems: Sequence[str]) -> None:
        self.path = path
        self.problems = tuple(problems)
        lines = "\n".join(f"{path}: {problem}" for problem in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) in configuration file {path}:\n{lines}")


class InvalidInstanceError(PacsBridgeError):
    """A received DICOM dataset cannot be indexed; the sender must correct it and send it again.

    ``keyword`` and ``tag`` name the attribute at fault (empty when the dataset as a whole is unreadable),
    ``detail`` says what is wrong with it, quoting the bad value.
    """

    def __init__(self, keyword: str, tag: str, detail: str) -> None:
        self.keyword = keyword
        self.tag = tag
        self.detail = detail
        where = f"{keyword} {tag}: " if keyword else ""
        super().__init__(f"{where}{detail}")


class ConflictingInstanceError(InvalidInstanceError):
    """The instance contradicts what the index already holds (a UID reused under another study or series).

    Policy: the first arrival is kept, the conflicting instance is refused, and neither study changes. The
    sender (or the PACS administrator) must resolve the UID clash.
    """


class SopClassMismatchError(InvalidInstanceError):
    """The dataset's SOP Class UID is not the one its C-STORE request and presentation context name (PS3.4
    "Data Set does not match SOP Class", 0xA900); the sender must send it under its own SOP class."""


class InstanceTooLargeError(PacsBridgeError):
    """A received data set is longer than ``dicom.max_instance_bytes``: it is refused and nothing of it is kept.

    Sending it again cannot succeed; raise the limit in the configuration if such instances are expected.
    """

    def __init__(self, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(f"instance over dicom.max_instance_bytes ({limit})")


class AssociationRefusedError(PacsBridgeError):
    """A C-STORE on an association the access check refused (``dicom.allowed_calling_aets``), received before the
    refusal ended it: nothing of it is stored. If the sender is meant to store here, list its calling AE title
    with the network it calls from."""


class UnknownStudyError(PacsBridgeError):
    """No study with this Study Instance UID is in the index; check the UID (pacs-bridge status lists studies)."""


class IndexNotFoundError(PacsBridgeError):
    """There is no pacs-bridge index where ``database.url`` points, and this command does not create one.

    Check that the configuration is the bridge's own (``--config``); the bridge creates its index when it first
    starts (``pacs-bridge run``).
    """


class IndexUnavailableError(PacsBridgeError):
    """The index database cannot be written (down, locked or full); check `database.url` and the server.

    The sender is told to retry later (DIMSE status 0xA700), so nothing is lost.
    """


class UnstorableValueError(PacsBridgeError):
    """The index database refused a value as data (one PostgreSQL text cannot hold, or too long for its column):
    the database works, and storing the same value again would fail again.

    The DICOM listener answers 0xC000, never 0xA700 (a retry cannot help). Extraction refuses such values with
    ``InvalidInstanceError`` naming the attribute before they reach the database; this is the safety net.
    """


class PublishError(PacsBridgeError):
    """The FHIR server did not accept a resource.

    ``retryable`` is true for failures that may pass by themselves (network errors, 408, 429, 5xx); the
    study then stays pending and is sent again later. Otherwise the study is marked failed with ``detail``
    (the server's OperationOutcome text) until it changes or the operator retries it.
    """

    def __init__(
        self,
        detail: str,
        *,
        retryable: bool,
        http_status: int | None = None,
        retry_after_seconds: float | None = None,
    ) -> None:
        self.detail = redact_urls(detail)
        self.retryable = retryable
        self.http_status = http_status
        self.retry_after_seconds = retry_after_seconds
        status = f"HTTP {http_status}: " if http_status is not None else ""
        super().__init__(f"{status}{detail}")


class ListenError(PacsBridgeError):
    """A port the bridge serves cannot be opened; the message names the port, the keys that set it and what to do."""

    def __init__(self, *, service: str, key_prefix: str, bind: str, port: int, cause: OSError) -> None:
        self.port = port
        where = f"cannot listen for {service} on {bind}:{port} ({key_prefix}.bind, {key_prefix}.port)"
        if cause.errno == errno.EADDRINUSE:
            advice = (
                f"the port is already in use, perhaps by another pacs-bridge; stop the program holding it "
                f"(`ss -ltnp 'sport = :{port}'` names it) or set {key_prefix}.port to a free port"
            )
        elif cause.errno == errno.EACCES:
            advice = (
                f"this user may not listen on port {port}; ports below 1024 need the CAP_NET_BIND_SERVICE "
                f"capability (see deploy/pacs-bridge.service), or set {key_prefix}.port to 1024 or above"
            )
        elif cause.errno == errno.EADDRNOTAVAIL:
            advice = (
                f"{bind} is not an address of this host; set {key_prefix}.bind to one of its addresses, or 0.0.0.0 "
                "for all of them"
            )
        else:
            advice = cause.strerror or str(cause)
        super().__init__(f"{where}: {advice}")


# The errors of bind() that ListenError explains; any other OSError is not about the address.
LISTEN_ERRNOS = frozenset({errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL})


class PacsQueryError(PacsBridgeError):
    """The PACS gave no usable answer to a backfill query (an error status, garbage, a timeout, a dropped
    association); the message names the window or study and why. The backfill goes on with the next one and
    exits non-zero; running it again retries what failed."""


class PacsUnreachableError(PacsBridgeError):
    """The backfill cannot reach the PACS at all: nothing answered at its URL or AE from the start, or several
    requests in a row found it gone. Asking about each window would only wait for each in turn, so the run
    stops; the message names the URL or AE and what to check, and the same command continues the run."""


class BackfillStoppedError(PacsBridgeError):
    """The backfill was stopped (SIGINT or SIGTERM) before its end; run the same command again to continue."""
