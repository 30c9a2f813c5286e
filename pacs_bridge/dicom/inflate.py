"""A deflated dataset (Deflated Explicit VR Little Endian, PS3.5 A.5), inflated as a stream in bounded memory.

A C-STORE in that transfer syntax carries its dataset as a raw deflate bitstream, and 1 MB of it may inflate to
1 GiB or more (a deflate bomb). ``InflatedStream`` inflates only as far as it is read: the header reader reads
the first elements, and what it read is kept (in memory while small, then in an anonymous temporary file) so
that it may seek back. ``drain`` then inflates the rest a chunk at a time and throws it away, so the whole
bitstream is checked (corrupt or cut-short data is refused) and its inflated size counted against
``max_bytes``, while memory stays at a few hundred kB whatever the ratio. Nothing past the header is kept.
"""

from __future__ import annotations

import io
import tempfile
import zlib
from typing import Any, BinaryIO

from pacs_bridge.errors import InvalidInstanceError

DEFLATED_CHUNK = 64 * 1024  # compressed bytes taken from the received dataset at a time
INFLATED_CHUNK = 256 * 1024  # the most zlib inflates in one call (the rest waits in its unconsumed input)
KEPT_IN_MEMORY = 4 * 1024 * 1024  # inflated header bytes kept in memory before they go to a temporary file


class InflatedStream:
    """The inflated bytes of ``deflated`` (a raw deflate bitstream), as a read-only file object for the header
    reader (``read``, ``seek``, ``tell``).

    Raises ``InvalidInstanceError`` when the bitstream is corrupt, ends before its last block, or inflates to
    more than ``max_bytes``.
    """

    def __init__(self, deflated: BinaryIO, *, max_bytes: int) -> None:
        self._source = deflated
        self._max_bytes = max_bytes
        self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        # Every byte inflated before drain() is kept: the header reader reads, skips and seeks back within it.
        self._kept: Any = tempfile.SpooledTemporaryFile(max_size=KEPT_IN_MEMORY)  # noqa: SIM115 - closed by close()
        self._kept_bytes = 0
        self._position = 0
        self.inflated_bytes = 0  # inflated so far, kept or thrown away
        self._ended = False  # the bitstream's last block is inflated

    def read(self, size: int | None = -1) -> bytes:
        wanted = -1 if size is None or size < 0 else size
        self._keep_until(None if wanted < 0 else self._position + wanted)
        self._kept.seek(self._position)
        data = bytes(self._kept.read(wanted))
        self._position += len(data)
        return data

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            position = offset
        elif whence == io.SEEK_CUR:
            position = self._position + offset
        else:  # from the end: only known once everything is inflated (and kept, within max_bytes)
            self._keep_until(None)
            position = self._kept_bytes + offset
        if position < 0:
            raise ValueError(f"negative seek position {position}")
        self._position = position  # past what is kept: the next read inflates up to it
        return position

    def tell(self) -> int:
        return self._position

    def drain(self) -> int:
        """Inflate whatever has not been read, throwing it away; the inflated size of the whole dataset."""
        while not self._ended:
            self._inflate_some()
        return self.inflated_bytes

    def close(self) -> None:
        self._kept.close()

    def __enter__(self) -> InflatedStream:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _keep_until(self, end: int | None) -> None:
        """Inflate and keep bytes until ``end`` bytes are kept (None: all of them) or the bitstream ends."""
        while (end is None or self._kept_bytes < end) and not self._ended:
            piece = self._inflate_some()
            if piece:
                self._kept.seek(0, io.SEEK_END)
                self._kept.write(piece)
                self._kept_bytes += len(piece)

    def _inflate_some(self) -> bytes:
        """The next inflated bytes (at most ``INFLATED_CHUNK``), counted against ``max_bytes``."""
        data = self._inflater.unconsumed_tail or self._source.read(DEFLATED_CHUNK)
        try:
            # With no input left, zlib may still hold output it could not give within INFLATED_CHUNK.
            piece = self._inflater.decompress(data, INFLATED_CHUNK)
        except zlib.error as exc:
            raise InvalidInstanceError("", "", f"the deflated data is corrupt ({exc})") from exc
        self._ended = self._inflater.eof  # bytes after the last block (padding) are left alone
        if not data and not piece and not self._ended:
            raise InvalidInstanceError("", "", "the deflated data ends before the end of its last deflate block")
        self.inflated_bytes += len(piece)
        if self.inflated_bytes > self._max_bytes:
            raise InvalidInstanceError(
                "", "", f"inflates to over {self._max_bytes} bytes (dicom.max_inflated_bytes); refused"
            )
        return piece
