"""Reading a received instance's header: the elements ``extract`` needs, stopping before the pixel data.

``read_header`` gives ``extract`` a pydicom ``Dataset`` of raw (undecoded) elements: only those in
``HEADER_TAGS``, and nothing after the last of them, so pixel data is never read, let alone decoded.

pydicom's ``read_dataset`` does that with a generator that, for every element up to the last header tag, reads
its header through a file object, builds a ``BaseTag``, calls the stop callback and skips or reads the value:
about a quarter of a listener process's time with 10 kB instances. ``scan_header`` walks the same elements
over bytes with one ``struct`` call each, for the encoding that nearly every sender uses: little endian, the VR
explicit or implicit as the transfer syntax says, every element before the last header tag of defined length.
It gives the same raw elements pydicom's reader gives, or ``None`` for anything else (an undefined length, a VR
it does not know, an encoding that contradicts the transfer syntax, a header longer than what it looks at), and
then pydicom reads the header elements, with all its leniency and checks, as before.

What pydicom may cost is bounded first. Its reader builds a ``Dataset`` for every item of every sequence of
undefined length it passes, wanted or not, and reads a value of undefined length whole: a dataset of many tiny
sequence items before the last header tag (17.6 MB on the wire) would cost it over 1 GB. ``HeaderWalk`` walks
the elements up to the last header tag first, reading only element and item headers and seeking over what is
not wanted, and hands pydicom the wanted elements alone, as received. It refuses (``InvalidInstanceError``,
0xC000, naming the element and the limit) a header past what any real modality sends:

- a value of a header element, or of an element inside a wanted sequence, over ``MAX_HEADER_VALUE_BYTES``;
- over ``MAX_HEADER_ENTRIES`` elements and sequence items (fragments included) up to the last header tag,
  wanted or not (each is a Python object once pydicom reads it, and a step of the walk);
- sequences nested over ``MAX_HEADER_DEPTH`` deep;
- wanted elements of over ``MAX_HEADER_BYTES`` in all.

Values after the last header tag (pixel data, and any other bulk data) are never looked at, whatever their size;
values before it that are not wanted (an encapsulated document, a vendor's private blob) are skipped unread.
"""

from __future__ import annotations

import functools
import io
import struct
from typing import Any, BinaryIO, cast

from pydicom.charset import convert_encodings, default_encoding
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import RawDataElement, convert_raw_data_element, empty_value_for_VR
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag
from pydicom.uid import UID
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, VR

from pacs_bridge.dicom.extract import HEADER_TAGS
from pacs_bridge.dicom.inflate import InflatedStream
from pacs_bridge.errors import InvalidInstanceError

LAST_HEADER_TAG = max(HEADER_TAGS)
SCANNED_BYTES = 256 * 1024  # how much of a dataset scan_header looks at; a longer header is pydicom's to read
# What a header may cost (see the module docstring). A real header element is at most a few kB (an LT of 10240
# characters); a header holds a few hundred elements, and a rejection note withdrawing a 20000-instance study
# ~70000 elements and items; an SR nests ~10 deep.
MAX_HEADER_VALUE_BYTES = 1024 * 1024  # at least SCANNED_BYTES: scan_header never passes a value the walk refuses
MAX_HEADER_ENTRIES = 200_000
MAX_HEADER_DEPTH = 32
MAX_HEADER_BYTES = 16 * 1024 * 1024
# The most a deflated dataset may inflate to (dicom.max_inflated_bytes): deflate is used for reports and other
# small objects, whose ratio stays far below what a 1 MB bitstream inflating to 1 GiB shows.
DEFAULT_MAX_INFLATED_BYTES = 256 * 1024 * 1024
_SPECIFIC_CHARACTER_SET = 0x00080005
_WANTED = frozenset(HEADER_TAGS) | {_SPECIFIC_CHARACTER_SET}  # pydicom's reader always keeps the character set
_UNDEFINED_LENGTH = 0xFFFFFFFF
_EXPLICIT = struct.Struct("<HH2sH")  # group, element, VR, 16-bit length
_IMPLICIT = struct.Struct("<HHL")  # group, element, 32-bit length
_LONG_LENGTH = struct.Struct("<L")
_KNOWN_VRS = {vr.value.encode("ascii"): vr.value for vr in VR}
_LONG_VRS = frozenset(vr.encode("ascii") for vr in EXPLICIT_VR_LENGTH_32)
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_WANTED_SEQUENCES = frozenset(tag for tag in _WANTED if dictionary_VR(tag) == "SQ")


def read_header(
    encoded: BinaryIO, transfer_syntax: UID, *, max_inflated_bytes: int = DEFAULT_MAX_INFLATED_BYTES
) -> Dataset:
    """The header elements ``extract`` reads (``HEADER_TAGS``), raw, from the encoded dataset; nothing after them.

    A deflated dataset is inflated as a stream (``dicom/inflate.py``): the header is read, then the rest is
    inflated and thrown away, so that a corrupt bitstream, or one inflating to over ``max_inflated_bytes``, is
    refused before anything is indexed. Raises ``InvalidInstanceError`` when the dataset cannot be decoded or ends
    inside one of the header's values."""
    encoded.seek(0)
    if not transfer_syntax.is_deflated:
        return _read_header(encoded, transfer_syntax)
    with InflatedStream(encoded, max_bytes=max_inflated_bytes) as inflated:
        dataset = _read_header(cast(BinaryIO, inflated), transfer_syntax)
        inflated.drain()
    return dataset


def _read_header(stream: BinaryIO, transfer_syntax: UID) -> Dataset:
    """``read_header`` on a stream of the dataset as encoded (inflated already, when deflated), at its start."""
    try:
        if transfer_syntax.is_little_endian:
            start = stream.read(SCANNED_BYTES)
            complete = len(start) < SCANNED_BYTES
            scanned = scan_header(start, implicit_vr=transfer_syntax.is_implicit_VR, complete=complete)
            if scanned is not None:
                return scanned  # whole values only: nothing for refuse_truncated to find
            stream.seek(0)
        walk = HeaderWalk(
            stream, implicit_vr=transfer_syntax.is_implicit_VR, little_endian=transfer_syntax.is_little_endian
        )
        wanted = io.BytesIO(walk.wanted_elements())
        dataset = read_dataset(
            wanted,
            walk.implicit_vr,
            transfer_syntax.is_little_endian,
            stop_when=lambda tag, _vr, _length: tag > LAST_HEADER_TAG,
            specific_tags=list(HEADER_TAGS),
        )
    except InvalidInstanceError:  # an inflated stream's refusal says what is wrong already
        raise
    except Exception as exc:  # pydicom raises assorted types for truncated or garbled streams
        raise InvalidInstanceError("", "", f"dataset cannot be decoded ({type(exc).__name__}: {exc})") from exc
    return refuse_truncated(dataset)


def scan_header(data: bytes, *, implicit_vr: bool, complete: bool) -> Dataset | None:
    """The header elements of a little-endian dataset encoded in ``data``, as pydicom's ``read_dataset`` would
    give them (same raw elements, same original encoding), or None where pydicom should read it (see the module
    docstring). ``complete``: ``data`` is the whole dataset, not only its start."""
    elements: dict[BaseTag, Any] = {}
    position, end = 0, len(data)
    if end < 8 or _looks_explicit(data) == implicit_vr:
        return None  # too short to judge, or the first element contradicts the transfer syntax: pydicom decides
    while True:
        if end - position < 8:
            if complete:
                break  # pydicom's reader ends there too (a cut element header is no element)
            return None
        if implicit_vr:
            group, element, length = _IMPLICIT.unpack_from(data, position)
            vr = None
            value_at = position + 8
        else:
            group, element, raw_vr, length = _EXPLICIT.unpack_from(data, position)
            vr = _KNOWN_VRS.get(raw_vr)
            if vr is None:
                return None
            value_at = position + 8
            if raw_vr in _LONG_VRS:
                if end - value_at < 4:
                    return None  # pydicom's reader fails there
                (length,) = _LONG_LENGTH.unpack_from(data, value_at)
                value_at += 4
        tag = group << 16 | element
        if tag > LAST_HEADER_TAG:
            break
        if length == _UNDEFINED_LENGTH or group == 0xFFFE:
            return None
        position = value_at + length
        if tag not in _WANTED:
            continue
        if value_at + length > end:
            # The value goes on past what was looked at, or the dataset ends inside it: pydicom reads it, and
            # refuse_truncated names the element. A scanned dataset holds whole values only.
            return None
        if tag in _WANTED_SEQUENCES and vr in (None, "SQ", "UN"):
            # Its items are read when extract decodes it (a sequence sent as UN, in implicit VR): the walk holds
            # them to the same limits.
            walk = HeaderWalk(io.BytesIO(data), implicit_vr=implicit_vr or vr == "UN", little_endian=True)
            walk.check_sequence(tag, value_at, length)
        value: Any = data[value_at : value_at + length] if length else empty_value_for_VR(vr, raw=True)
        elements[BaseTag(tag)] = RawDataElement(BaseTag(tag), vr, length, value, value_at, implicit_vr, True)
    dataset = Dataset(elements)
    encoding: Any = default_encoding
    character_set = elements.get(BaseTag(_SPECIFIC_CHARACTER_SET))
    if character_set is not None:
        encoding = list(_encodings(character_set.value, character_set.VR, implicit_vr))
    dataset.set_original_encoding(implicit_vr, True, encoding)
    return dataset


@functools.lru_cache(maxsize=64)  # senders state one or two character sets, again in every instance
def _encodings(value: bytes | None, vr: str | None, implicit_vr: bool) -> tuple[str, ...]:
    """The Python encodings of a Specific Character Set value, as pydicom converts the raw element."""
    element = RawDataElement(BaseTag(_SPECIFIC_CHARACTER_SET), vr, len(value or b""), value, 0, implicit_vr, True)
    return tuple(convert_encodings(convert_raw_data_element(element).value))


def _looks_explicit(data: bytes) -> bool:
    """pydicom's test of the first element: its bytes 4-5 are two upper-case letters, a VR."""
    return 0x40 < data[4] < 0x5B and 0x40 < data[5] < 0x5B


def refuse_truncated(dataset: Dataset) -> Dataset:
    """``dataset``, unless the stream ended inside one of its values.

    pydicom hands back whatever it could read of a value cut short, and a cut UID may still look valid (one
    cut after "1.2.3.4" of "1.2.3.4.5" is a UID): indexed, it would put the instance in a series or study
    that does not exist. Raises ``InvalidInstanceError`` naming the element instead, as it does for an element
    whose value representation DICOM does not define.
    """
    for tag in dataset.keys():  # noqa: SIM118 - iterating the Dataset itself would decode every element
        try:
            raw = dataset.get_item(tag)
        except NotImplementedError as exc:  # pydicom's answer to a VR that DICOM does not define
            raise InvalidInstanceError(keyword_for_tag(tag) or "", _tag_text(tag), f"cannot be decoded: {exc}") from exc
        if not isinstance(raw, RawDataElement) or not isinstance(raw.value, bytes) or raw.length == 0xFFFFFFFF:
            continue
        if len(raw.value) < raw.length:
            raise InvalidInstanceError(
                keyword_for_tag(tag) or "",
                f"({tag.group:04X},{tag.element:04X})",
                f"truncated: the dataset ends inside this value ({len(raw.value)} of {raw.length} bytes)",
            )
    return dataset


def _tag_text(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _over_limit(tag: int, detail: str) -> InvalidInstanceError:
    return InvalidInstanceError(keyword_for_tag(tag) or "", _tag_text(tag), detail)


def _is_sequence_tag(tag: int) -> bool:
    try:
        return bool(dictionary_VR(tag) == "SQ")
    except KeyError:  # a private or unknown tag
        return False


class HeaderWalk:
    """Walks a dataset's elements up to ``LAST_HEADER_TAG`` within the header limits (see the module docstring),
    reading element and item headers only; ``wanted_elements`` gives the wanted ones as received."""

    def __init__(self, stream: BinaryIO, *, implicit_vr: bool, little_endian: bool) -> None:
        self._stream = stream
        self.implicit_vr = implicit_vr
        order = "<" if little_endian else ">"
        self._explicit = struct.Struct(order + "HH2sH")
        self._implicit = struct.Struct(order + "HHL")
        self._long = struct.Struct(order + "L")
        self.entries = 0  # elements and items walked

    def wanted_elements(self) -> bytes:
        """The header elements pydicom's reader would keep (``HEADER_TAGS`` and the character set), encoded as
        received, from the stream's start up to the first element past ``LAST_HEADER_TAG``. An element the data
        ends inside is given as far as it goes (``refuse_truncated`` names it). Raises ``InvalidInstanceError``
        past a limit."""
        stream = self._stream
        first = stream.read(6)
        stream.seek(0)
        if len(first) == 6:  # pydicom's reader goes by the first element too, whatever the transfer syntax says
            self.implicit_vr = not _looks_explicit(first)
        parts: list[bytes] = []
        kept = 0
        while True:
            start = stream.tell()
            header = self._element_header()
            if header is None:
                break
            tag, vr, length = header
            if tag > LAST_HEADER_TAG or tag == _ITEM_END:
                break
            self._count(tag)
            wanted = tag in _WANTED
            whole = self._skip_value(tag, vr, length, depth=0, wanted=wanted)
            if wanted:
                end = stream.tell()
                kept += end - start
                if kept > MAX_HEADER_BYTES:
                    raise _over_limit(tag, f"header elements over {MAX_HEADER_BYTES} bytes in all")
                stream.seek(start)
                parts.append(stream.read(end - start))
            if not whole:
                break
        return b"".join(parts)

    def check_sequence(self, tag: int, position: int, length: int) -> None:
        """Hold the wanted sequence ``tag`` of defined ``length``, its value at ``position``, to the limits."""
        self._stream.seek(position)
        self._items(tag, length, depth=1, wanted=True, sequence=True)

    def _element_header(self) -> tuple[int, str | None, int] | None:
        """The next element's tag, VR (None: implicit) and length, read as pydicom's reader reads them; None
        at the end of the data."""
        data = self._stream.read(8)
        if len(data) < 8:
            return None
        if self.implicit_vr:
            group, element, length = self._implicit.unpack(data)
            return group << 16 | element, None, length
        group, element, raw_vr, length = self._explicit.unpack(data)
        tag = group << 16 | element
        if group == 0xFFFE:  # item and delimitation headers have no VR
            return tag, None, self._implicit.unpack(data)[2]
        vr = _KNOWN_VRS.get(raw_vr)
        if vr is None:
            if not (b"AA" <= raw_vr <= b"ZZ"):  # pydicom takes such an element for implicit VR
                return tag, None, self._implicit.unpack(data)[2]
            return tag, raw_vr.decode("ascii"), length
        if raw_vr in _LONG_VRS:
            extra = self._stream.read(4)
            if len(extra) < 4:
                return None
            (length,) = self._long.unpack(extra)
        return tag, vr, length

    def _count(self, tag: int) -> None:
        self.entries += 1
        if self.entries > MAX_HEADER_ENTRIES:
            raise _over_limit(tag, f"over {MAX_HEADER_ENTRIES} header elements/items")

    def _skip_value(self, tag: int, vr: str | None, length: int, *, depth: int, wanted: bool) -> bool:
        """Past the value of the element just read, holding it to the limits; False when the data ends first."""
        is_sequence = vr in ("SQ", "UN") if length == _UNDEFINED_LENGTH else vr == "SQ"
        if vr is None:
            is_sequence = _is_sequence_tag(tag) or (length == _UNDEFINED_LENGTH and self._next_is_item())
        if length == _UNDEFINED_LENGTH or (is_sequence and wanted):
            return self._items(tag, length, depth=depth + 1, wanted=wanted, sequence=is_sequence)
        if vr == "UN" and wanted and _is_sequence_tag(tag):
            # pydicom decodes a known sequence sent as UN as the sequence it is, in implicit VR (PS3.5 6.2.2)
            explicit, self.implicit_vr = not self.implicit_vr, True
            try:
                return self._items(tag, length, depth=depth + 1, wanted=wanted, sequence=True)
            finally:
                self.implicit_vr = not explicit
        if wanted and length > MAX_HEADER_VALUE_BYTES:
            raise _over_limit(tag, f"{length}-byte value, limit {MAX_HEADER_VALUE_BYTES}")
        self._stream.seek(length, io.SEEK_CUR)
        return True

    def _next_is_item(self) -> bool:
        data = self._stream.read(4)
        self._stream.seek(-len(data), io.SEEK_CUR)
        return len(data) == 4 and self._implicit.unpack(data + bytes(4))[:2] == (0xFFFE, 0xE000)

    def _items(self, tag: int, length: int, *, depth: int, wanted: bool, sequence: bool) -> bool:
        """Past the items of ``tag``'s value (a sequence's, or the fragments of an undefined length value) up to
        its delimiter or ``length``; False when the data ends first."""
        if depth > MAX_HEADER_DEPTH:
            raise _over_limit(tag, f"sequences nested over {MAX_HEADER_DEPTH} deep")
        stream = self._stream
        end = None if length == _UNDEFINED_LENGTH else stream.tell() + length
        fragment_bytes = 0
        while end is None or stream.tell() < end:
            data = stream.read(8)
            if len(data) < 8:
                return False
            group, element, item_length = self._implicit.unpack(data)
            item_tag = group << 16 | element
            if item_tag == _SEQUENCE_END and end is None:
                return True
            if item_tag != _ITEM:
                raise _over_limit(tag, f"holds {_tag_text(item_tag)} where an item belongs")
            self._count(tag)
            if not sequence:  # a fragment of a value of undefined length
                fragment_bytes += item_length
                if wanted and fragment_bytes > MAX_HEADER_VALUE_BYTES:
                    raise _over_limit(tag, f"value over {MAX_HEADER_VALUE_BYTES} bytes, the limit")
                stream.seek(item_length, io.SEEK_CUR)
            elif item_length == _UNDEFINED_LENGTH or wanted:
                if not self._item_elements(item_length, depth=depth, wanted=wanted):
                    return False
            else:
                stream.seek(item_length, io.SEEK_CUR)
        return True

    def _item_elements(self, length: int, *, depth: int, wanted: bool) -> bool:
        """Past the elements of one sequence item, up to its delimiter or ``length``."""
        stream = self._stream
        end = None if length == _UNDEFINED_LENGTH else stream.tell() + length
        while end is None or stream.tell() < end:
            header = self._element_header()
            if header is None:
                return False
            tag, vr, element_length = header
            if tag == _ITEM_END and end is None:
                return True
            self._count(tag)
            if not self._skip_value(tag, vr, element_length, depth=depth, wanted=wanted):
                return False
        return True
