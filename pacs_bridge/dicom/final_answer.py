"""Whether the bridge has given a connection its last word: the PDU after which nothing the peer sends matters.

After sending an A-ASSOCIATE-RJ, an A-RELEASE-RP or an A-ABORT, the acceptor waits for the peer to close the
connection (PS3.8 9.2, state Sta13) and ignores any PDU that still comes. pynetdicom waits there by reading: a
peer that keeps sending, or that sends the first bytes of one more PDU and then nothing, holds the association's
thread and one ``max_associations`` slot until the PDU deadline or the ARTIM timer runs out. A peer doing so once
a second kept every real sender out ("Local Limit Exceeded"). The guarded socket (dicom/connection.py)
therefore follows the PDUs it sends with ``SentPdus``; once one of these is sent whole, every later read of the
connection ends at once as if the peer had closed it, and pynetdicom closes the connection and frees the slot.

Pure: no I/O.
"""

from __future__ import annotations

from pacs_bridge.dicom.pdu_stream import A_ABORT, A_ASSOCIATE_RJ, A_RELEASE_RP, PDU_HEADER

LAST_WORDS = frozenset({A_ASSOCIATE_RJ, A_RELEASE_RP, A_ABORT})
"""The PDUs after which the acceptor only waits for the connection to close (PS3.8 9.2, Sta13)."""


class SentPdus:
    """Follows the bytes sent on one connection PDU by PDU (headers only); ``last_word`` is the type of the PDU in
    ``LAST_WORDS`` sent whole, once there is one."""

    __slots__ = ("_header", "_remaining", "_type", "last_word")

    def __init__(self) -> None:
        self._header = b""  # a PDU header sent in part so far
        self._remaining = 0  # bytes of the current PDU's body still to be sent
        self._type = 0
        self.last_word: int | None = None

    def sent(self, data: bytes | bytearray | memoryview) -> None:
        """``data`` went out, following what went out before."""
        view = memoryview(data).cast("B")
        position = 0
        while position < len(view) and self.last_word is None:
            if self._remaining:
                taken = min(self._remaining, len(view) - position)
                self._remaining -= taken
                position += taken
            else:
                wanted = PDU_HEADER.size - len(self._header)
                self._header += bytes(view[position : position + wanted])
                position += min(wanted, len(view) - position)
                if len(self._header) < PDU_HEADER.size:
                    return
                self._type, _reserved, self._remaining = PDU_HEADER.unpack(self._header)
                self._header = b""
            if not self._remaining and self._type in LAST_WORDS:
                self.last_word = self._type
