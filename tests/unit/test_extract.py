"""Unit tests for ``pacs_bridge.dicom.extract``: a pydicom Dataset -> the InstanceRecord the index keeps.

Datasets come from two sources, because the listener sees the second and the other tests build the first:
"in code" (pydicom element values set by keyword) and "from the wire" (bytes written in Explicit VR Little
Endian and read back with ``read_dataset``, so the values stay raw until extract reads them). Malformed
values are only possible on the wire without pydicom's own validation warnings, so most of them are built
as raw bytes here.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Iterator
from io import BytesIO
from typing import Any, BinaryIO, cast

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydicom import config as pydicom_config
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.tag import Tag
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from pacs_bridge.dicom.extract import HEADER_KEYWORDS, HEADER_TAGS, MODALITY_WHEN_ABSENT, extract_instance
from pacs_bridge.dicom.header import read_header
from pacs_bridge.errors import InvalidInstanceError
from pacs_bridge.records import CodedConcept, InstanceRecord, RequestedReason, SeriesAttributes, StudyAttributes
from tests.support.studies import make_dataset, uid


def encode(ds: Dataset) -> bytes:
    """``ds`` as Explicit VR Little Endian dataset bytes (no file meta), as a C-STORE carries it."""
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    write_dataset(fp, ds)
    return fp.getvalue()


def raw_element(keyword: str, value: bytes) -> bytes:
    """One Explicit VR Little Endian element with exactly ``value`` as its bytes (no padding, no checks)."""
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    vr = dictionary_VR(tag)
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode("ascii"), len(value)) + value


def decode(data: bytes, **kwargs: Any) -> Dataset:
    """Read dataset bytes the way the listener does: values stay raw until an element is read."""
    stream = cast(BinaryIO, DicomBytesIO(data))
    return read_dataset(stream, is_implicit_VR=False, is_little_endian=True, **kwargs)


def from_wire(ds: Dataset, **raw_values: bytes) -> Dataset:
    """``ds`` written and read back, with the elements named in ``raw_values`` replaced by those exact bytes."""
    for keyword in raw_values:
        if keyword in ds:
            delattr(ds, keyword)
    data = encode(ds) + b"".join(raw_element(keyword, value) for keyword, value in raw_values.items())
    return decode(data)


@pytest.fixture
def lenient_pydicom() -> Iterator[None]:
    """Let invalid values be set in code without pydicom's validation warning (pytest turns it into an error)."""
    settings = pydicom_config.settings
    previous = settings.reading_validation_mode
    settings.reading_validation_mode = pydicom_config.IGNORE
    yield
    settings.reading_validation_mode = previous


EXPECTED_DEFAULT_RECORD = InstanceRecord(
    study=StudyAttributes(
        study_uid=uid("1"),
        patient_id="PAT-0001",
        issuer_of_patient_id="",
        patient_name="Doe^Jane",
        accession_number="ACC-0001",
        study_date="20240315",
        study_time="101530",
        timezone_offset="",
        study_description="CT chest",
    ),
    series=SeriesAttributes(
        series_uid=uid("2.1"),
        modality="CT",
        series_number=1,
        series_description="Axial 5mm",
        series_date="20240315",
        series_time="101600",
    ),
    sop_instance_uid=uid("3.1.1"),
    sop_class_uid=CTImageStorage,
    instance_number=1,
)


def test_extract_instance_maps_every_indexed_attribute_of_a_minimal_ct_dataset() -> None:
    """The default test dataset gives the complete record, field by field."""
    assert extract_instance(make_dataset()) == EXPECTED_DEFAULT_RECORD


def test_extract_instance_keeps_issuer_and_timezone_offset_when_present() -> None:
    """IssuerOfPatientID and TimezoneOffsetFromUTC reach the study attributes."""
    record = extract_instance(make_dataset(IssuerOfPatientID="HOSP-A", TimezoneOffsetFromUTC="+0530"))

    assert (record.study.issuer_of_patient_id, record.study.timezone_offset) == ("HOSP-A", "+0530")


REQUIRED_UIDS = [
    ("StudyInstanceUID", "(0020,000D)"),  # keys the study
    ("SeriesInstanceUID", "(0020,000E)"),  # keys the series
    ("SOPInstanceUID", "(0008,0018)"),  # keys the instance
    ("SOPClassUID", "(0008,0016)"),  # becomes series.instance.sopClass, 1..1 in FHIR
]

UID_DEFECTS = [
    pytest.param(None, id="missing"),  # element absent
    pytest.param("", id="empty"),  # element present with no value
    pytest.param("1.2." + "3" * 61, id="65-chars"),  # one character over the UI limit of 64
    pytest.param("1.2.840.abc", id="letters"),  # UIDs are digits and dots only
    pytest.param("1.2..3", id="empty-component"),  # a component cannot be empty
]


@pytest.mark.usefixtures("lenient_pydicom")
@pytest.mark.parametrize(("keyword", "tag"), REQUIRED_UIDS)
@pytest.mark.parametrize("bad_value", UID_DEFECTS)
def test_bad_required_uid_set_in_code_raises_invalid_instance_error_naming_it(
    keyword: str, tag: str, bad_value: str | None
) -> None:
    """A missing, empty, over-long or malformed required UID is refused, naming its keyword and tag."""
    ds = make_dataset(**{keyword: bad_value})

    with pytest.raises(InvalidInstanceError) as caught:
        extract_instance(ds)

    assert (caught.value.keyword, caught.value.tag) == (keyword, tag)
    assert keyword in str(caught.value)


@pytest.mark.parametrize(("keyword", "tag"), REQUIRED_UIDS)
@pytest.mark.parametrize(
    "raw_value",
    [
        b"",  # element present with length 0
        b"\x00\x00",  # only padding
        b"1.2." + b"3" * 61 + b"\x00",  # 65 characters, padded to an even length
        b"1.2.840.abc\x00",  # letters
        b"1.2.840.\xe9",  # a non-ASCII byte
    ],
)
def test_bad_required_uid_from_the_wire_raises_invalid_instance_error_naming_it(
    keyword: str, tag: str, raw_value: bytes
) -> None:
    """The same refusal holds for raw bytes received over the network."""
    ds = from_wire(make_dataset(), **{keyword: raw_value})

    with pytest.raises(InvalidInstanceError) as caught:
        extract_instance(ds)

    assert (caught.value.keyword, caught.value.tag) == (keyword, tag)


def test_invalid_uid_error_detail_quotes_the_bad_value() -> None:
    """The operator sees the offending value in the error, not only the attribute name."""
    ds = from_wire(make_dataset(), StudyInstanceUID=b"1.2.840.abc\x00")

    with pytest.raises(InvalidInstanceError, match=r"1\.2\.840\.abc"):
        extract_instance(ds)


def test_uid_of_exactly_64_characters_is_accepted() -> None:
    """64 characters is the UI maximum itself, not over it."""
    long_uid = "1.2." + "3" * 60

    record = extract_instance(make_dataset(SOPInstanceUID=long_uid))

    assert record.sop_instance_uid == long_uid


@pytest.mark.parametrize(
    "modality",
    [
        None,  # Modality absent (seen in some secondary-capture objects)
        "",  # Modality present but empty
    ],
)
def test_missing_or_empty_modality_gives_ot(modality: str | None) -> None:
    """A series without a modality is indexed as OT, DICOM's code for "other"."""
    ds = make_dataset(Modality=modality)

    assert extract_instance(ds).series.modality == MODALITY_WHEN_ABSENT == "OT"


def test_lowercase_modality_from_the_wire_is_upper_cased() -> None:
    """A sender writing 'ct' still indexes as the defined term CT."""
    ds = from_wire(make_dataset(), Modality=b"ct")

    assert extract_instance(ds).series.modality == "CT"


def test_modality_with_invalid_characters_raises_naming_modality() -> None:
    """A Modality that is not a code string is refused, naming Modality (0008,0060)."""
    ds = from_wire(make_dataset(), Modality=b"C-T!")

    with pytest.raises(InvalidInstanceError) as caught:
        extract_instance(ds)

    assert (caught.value.keyword, caught.value.tag) == ("Modality", "(0008,0060)")


@pytest.mark.parametrize("keyword", ["InstanceNumber", "SeriesNumber"])
@pytest.mark.parametrize(
    "raw_value",
    [
        b"1a",  # trailing letter
        b"abc ",  # no digits at all
        b"1.5 ",  # a decimal, not an integer string
        b"-1",  # negative: FHIR number is unsignedInt
        b"2147483648",  # 2**31: over FHIR unsignedInt
        b"\xff\xfe",  # not ASCII
        b"",  # present but empty
    ],
)
def test_malformed_instance_or_series_number_gives_none(keyword: str, raw_value: bytes) -> None:
    """An IS number that is not a non-negative 32-bit integer is dropped, not a reason to refuse the instance."""
    record = extract_instance(from_wire(make_dataset(), **{keyword: raw_value}))

    numbers = {"InstanceNumber": record.instance_number, "SeriesNumber": record.series.series_number}
    assert numbers[keyword] is None


def test_missing_instance_and_series_numbers_give_none() -> None:
    """Absent InstanceNumber and SeriesNumber (Type 2/3 in practice) give None."""
    record = extract_instance(make_dataset(InstanceNumber=None, SeriesNumber=None))

    assert (record.instance_number, record.series.series_number) == (None, None)


def test_trailing_padding_is_stripped_from_every_value_read_from_the_wire() -> None:
    """Space and NUL padding (and leading IS spaces) never reach the record."""
    ds = from_wire(
        make_dataset(),
        StudyInstanceUID=uid("1").encode() + b"\x00",  # UI pads with NUL
        Modality=b"CT  ",  # CS pads with spaces
        AccessionNumber=b"ACC-0001  ",  # SH
        PatientID=b"PAT-0001  ",  # LO
        StudyDescription=b"CT chest  ",  # LO
        StudyDate=b"20240315  ",  # DA
        StudyTime=b"101530  ",  # TM
        InstanceNumber=b"  1 ",  # IS may carry leading and trailing spaces
    )

    assert extract_instance(ds) == EXPECTED_DEFAULT_RECORD


def test_multi_valued_ascii_value_from_the_wire_keeps_its_first_value() -> None:
    """A backslash-separated value (VM > 1 where 1 is expected) yields its first value."""
    ds = from_wire(make_dataset(), Modality=b"CT\\PT ")

    assert extract_instance(ds).series.modality == "CT"


@pytest.mark.parametrize(
    ("character_set", "description"),
    [
        ("ISO_IR 100", "Tête-à-tête thoracique"),  # Latin-1: é/ê/à are single bytes
        ("ISO_IR 192", "Thorax Übersicht 東京"),  # UTF-8, the test dataset's default
    ],
)
def test_dataset_read_back_from_bytes_gives_the_same_record(character_set: str, description: str) -> None:
    """Written to bytes and read back, a dataset extracts exactly as it did in memory, text decoded right."""
    in_memory = make_dataset(SpecificCharacterSet=character_set, StudyDescription=description)

    from_bytes = decode(encode(in_memory))

    record = extract_instance(from_bytes)
    assert record == extract_instance(in_memory)
    assert record.study.study_description == description


def test_latin1_study_description_is_encoded_as_single_bytes_on_the_wire() -> None:
    """The Latin-1 round trip really goes through ISO 8859-1 bytes, not UTF-8."""
    data = encode(make_dataset(SpecificCharacterSet="ISO_IR 100", StudyDescription="Tête"))

    assert b"T\xeate" in data
    assert "Tête".encode() not in data


def test_reading_only_the_header_tags_gives_the_same_record() -> None:
    """HEADER_TAGS is every element extract needs: the listener's header-only read loses nothing."""
    data = encode(make_dataset(IssuerOfPatientID="HOSP-A", TimezoneOffsetFromUTC="-0800"))

    header_only = decode(data, specific_tags=list(HEADER_TAGS))

    assert extract_instance(header_only) == extract_instance(decode(data))


@pytest.mark.parametrize("keyword", HEADER_KEYWORDS)
def test_every_header_keyword_is_a_real_dicom_keyword(keyword: str) -> None:
    """Each keyword extract reads is in pydicom's data dictionary (a typo would silently read nothing)."""
    tag = tag_for_keyword(keyword)

    assert tag is not None
    assert keyword_for_tag(tag) == keyword


def test_header_tags_are_the_header_keywords_sorted_without_duplicates() -> None:
    """HEADER_TAGS lists one tag per keyword, in ascending order for the stop-before-pixels read."""
    assert list(HEADER_TAGS) == sorted({int(Tag(keyword)) for keyword in HEADER_KEYWORDS})
    assert len(HEADER_TAGS) == len(HEADER_KEYWORDS)


# ---- the attributes the FHIR mapping needs (issue 3) -------------------------------------------------------


def code_item(value: str, scheme: str, meaning: str, **extra: str) -> Dataset:
    """One Basic Code Sequence Macro item."""
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    for keyword, text in extra.items():
        setattr(item, keyword, text)
    return item


CT_CHEST = CodedConcept(code="24627-2", scheme="LN", meaning="CT Chest")
REQUESTED_CT = CodedConcept(code="RPID-CT", scheme="99ORDERS", meaning="CT thorax requested")
COUGH = CodedConcept(code="49727002", scheme="SCT", meaning="Cough")


def mapping_dataset(**overrides: Any) -> Dataset:
    """The default test dataset with every attribute the mapping reads, the order's in a request item."""
    request = Dataset()
    request.RequestedProcedureCodeSequence = [code_item("RPID-CT", "99ORDERS", "CT thorax requested")]
    request.ReasonForTheRequestedProcedure = "Persistent cough"
    request.ReasonForRequestedProcedureCodeSequence = [code_item("49727002", "SCT", "Cough")]
    ds = make_dataset(
        ReferringPhysicianName="Doe^Jane",
        NameOfPhysiciansReadingStudy=["House^Gregory^^Dr.", "Cuddy^Lisa"],
        ProcedureCodeSequence=[code_item("24627-2", "LN", "CT Chest")],
        PerformingPhysicianName="Wilson^James",
        OperatorsName=["Tech^Tom", "Tech^Tina"],
        BodyPartExamined="CHEST",
        Laterality="R",
        ImageLaterality="R",
        RequestAttributesSequence=[request],
    )
    for keyword, value in overrides.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


EXPECTED_MAPPING_RECORD = dataclasses.replace(
    EXPECTED_DEFAULT_RECORD,
    study=dataclasses.replace(
        EXPECTED_DEFAULT_RECORD.study,
        referring_physician="Doe^Jane",
        reading_physicians=("House^Gregory^^Dr.", "Cuddy^Lisa"),
        procedure_codes=(CT_CHEST,),
        reasons=(RequestedReason(text="Persistent cough", codes=(COUGH,)),),
    ),
    series=dataclasses.replace(
        EXPECTED_DEFAULT_RECORD.series,
        body_part_examined="CHEST",
        laterality="R",
        performing_physicians=("Wilson^James",),
        operators=("Tech^Tom", "Tech^Tina"),
    ),
    image_laterality="R",
)


def test_extract_instance_keeps_every_attribute_the_mapping_needs() -> None:
    """Names, codes, reasons, body part and laterality reach the record, field by field."""
    assert extract_instance(mapping_dataset()) == EXPECTED_MAPPING_RECORD


def test_header_only_read_of_the_listener_keeps_nested_sequence_items() -> None:
    """read_header (the listener's reader) reads code sequences and the request item's nested sequences."""
    data = encode(mapping_dataset())

    header_only = read_header(BytesIO(data), ExplicitVRLittleEndian)

    assert extract_instance(header_only) == EXPECTED_MAPPING_RECORD


def test_header_only_read_stops_before_pixel_data() -> None:
    """The largest header tag is below the pixel data, so the listener never decodes pixels."""
    assert max(HEADER_TAGS) < 0x7FE00010


def test_requested_procedure_code_stands_in_when_no_procedure_code_sequence() -> None:
    """Without ProcedureCodeSequence the requested procedure's code (request item) is the procedure code."""
    record = extract_instance(mapping_dataset(ProcedureCodeSequence=None))

    assert record.study.procedure_codes == (REQUESTED_CT,)


PERSISTENT_COUGH = RequestedReason(text="Persistent cough", codes=(COUGH,))


def test_a_reason_stated_as_text_and_code_is_one_reason() -> None:
    """The request item's ReasonForTheRequestedProcedure and its code sequence are one reason, not two (issue 20)."""
    assert extract_instance(mapping_dataset()).study.reasons == (PERSISTENT_COUGH,)


def test_top_level_reason_and_request_item_reason_are_both_kept_once() -> None:
    """A reason stated at the top level and in the request item appears once; different ones both appear."""
    same = extract_instance(mapping_dataset(ReasonForTheRequestedProcedure="Persistent cough"))
    other = extract_instance(mapping_dataset(ReasonForTheRequestedProcedure="Follow-up"))

    assert same.study.reasons == (PERSISTENT_COUGH,)
    assert other.study.reasons == (RequestedReason(text="Follow-up"), PERSISTENT_COUGH)


def test_each_request_item_gives_its_own_reason_with_its_own_code() -> None:
    """Two requests, each with text and code: two reasons, each code with its own text; a code alone is a reason."""
    fever = Dataset()
    fever.ReasonForTheRequestedProcedure = "High fever"
    fever.ReasonForRequestedProcedureCodeSequence = [code_item("386661006", "SCT", "Fever")]
    code_only = Dataset()
    code_only.ReasonForRequestedProcedureCodeSequence = [code_item("267036007", "SCT", "Dyspnea")]
    ds = mapping_dataset()
    ds.RequestAttributesSequence = [*ds.RequestAttributesSequence, fever, code_only]

    assert extract_instance(ds).study.reasons == (
        PERSISTENT_COUGH,
        RequestedReason(text="High fever", codes=(CodedConcept(code="386661006", scheme="SCT", meaning="Fever"),)),
        RequestedReason(codes=(CodedConcept(code="267036007", scheme="SCT", meaning="Dyspnea"),)),
    )


def test_code_item_keeps_long_code_value_and_scheme_version() -> None:
    """LongCodeValue stands in for CodeValue; CodingSchemeVersion is kept."""
    item = Dataset()
    item.LongCodeValue = "A-VERY-LONG-LOCAL-PROCEDURE-CODE-OVER-SIXTEEN"
    item.CodingSchemeDesignator = "99LOCAL"
    item.CodingSchemeVersion = "2024"
    item.CodeMeaning = "Local procedure"

    record = extract_instance(make_dataset(ProcedureCodeSequence=[item]))

    assert record.study.procedure_codes == (
        CodedConcept(
            code="A-VERY-LONG-LOCAL-PROCEDURE-CODE-OVER-SIXTEEN",
            scheme="99LOCAL",
            meaning="Local procedure",
            scheme_version="2024",
        ),
    )


def test_code_item_without_code_or_meaning_is_left_out() -> None:
    """An empty item says nothing and is not kept."""
    record = extract_instance(make_dataset(ProcedureCodeSequence=[Dataset(), code_item("24627-2", "LN", "CT Chest")]))

    assert record.study.procedure_codes == (CT_CHEST,)


@pytest.mark.parametrize(
    ("overrides", "title"),
    [
        ({"ContentLabel": "MEASUREMENTS"}, "MEASUREMENTS"),  # presentation state / segmentation label
        ({"DocumentTitle": "Referral letter"}, "Referral letter"),  # encapsulated PDF or CDA
        (
            {"ConceptNameCodeSequence": [code_item("113701", "DCM", "X-Ray Radiation Dose Report")]},
            "X-Ray Radiation Dose Report",
        ),  # SR document title
        (
            {"ContentLabel": "LABEL", "DocumentTitle": "Title"},
            "LABEL",
        ),  # ContentLabel first
        ({}, ""),  # an image: no title
    ],
)
def test_instance_title_comes_from_label_title_or_concept_name(overrides: dict[str, Any], title: str) -> None:
    """ContentLabel, else DocumentTitle, else the meaning of ConceptNameCodeSequence."""
    assert extract_instance(make_dataset(**overrides)).title == title


@pytest.mark.usefixtures("lenient_pydicom")
def test_lower_case_body_part_and_laterality_are_upper_cased() -> None:
    """CS values are upper case by definition; lower-case senders are normalised."""
    record = extract_instance(mapping_dataset(BodyPartExamined="chest", Laterality="l", ImageLaterality="l"))

    assert (record.series.body_part_examined, record.series.laterality, record.image_laterality) == ("CHEST", "L", "L")


def padded(data: bytes) -> bytes:
    return data + b" " if len(data) % 2 else data


# (SpecificCharacterSet as on the wire, name as sent, the Unicode text the record must hold)
CHARACTER_SET_CASES = [
    # Latin-1: one byte per accented letter
    pytest.param(b"ISO_IR 100", "Müller^Zoë".encode("latin-1"), "Müller^Zoë", id="latin-1"),
    # UTF-8
    pytest.param(b"ISO_IR 192", "Øster^Åse=東京^太郎".encode(), "Øster^Åse=東京^太郎", id="utf-8"),
    # Japanese: ASCII alphabetic group, then JIS X 0208 kanji and hiragana groups switched in by ISO 2022 escapes
    pytest.param(
        b"\\ISO 2022 IR 87",
        b"Yamada^Tarou="
        + "山田".encode("iso2022_jp")
        + b"^"
        + "太郎".encode("iso2022_jp")
        + b"="
        + "やまだ".encode("iso2022_jp")
        + b"^"
        + "たろう".encode("iso2022_jp"),
        "Yamada^Tarou=山田^太郎=やまだ^たろう",
        id="iso-2022-ir-87",
    ),
]


@pytest.mark.parametrize(("character_set", "raw_name", "expected"), CHARACTER_SET_CASES)
def test_names_and_descriptions_are_decoded_with_the_specific_character_set(
    character_set: bytes, raw_name: bytes, expected: str
) -> None:
    """Raw bytes from the wire, read by the listener's header reader, arrive as the right Unicode."""
    wire = from_wire(
        make_dataset(),
        SpecificCharacterSet=padded(character_set),
        ReferringPhysicianName=padded(raw_name),
        PerformingPhysicianName=padded(raw_name),
    )
    # Written again (now in tag order, still the same bytes) and read the way the listener reads it.
    header_only = read_header(BytesIO(encode(wire)), ExplicitVRLittleEndian)

    record = extract_instance(header_only)

    assert record.study.referring_physician == expected
    assert record.series.performing_physicians == (expected,)


ASCII_TEXT = st.text(
    alphabet=st.characters(min_codepoint=0, max_codepoint=0x7F, exclude_characters="\x1b"),  # no ISO 2022 escape
    max_size=24,
)


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    character_set=st.sampled_from([b"", b"ISO_IR 100", b"ISO_IR 192", b"\\ISO 2022 IR 87", b"ISO_IR 13", b"GB18030"]),
    name=ASCII_TEXT,
    description=ASCII_TEXT,
    accession=ASCII_TEXT,
    body_part=ASCII_TEXT,
)
@example(character_set=b"", name="Doe^John=", description="A=B", accession="", body_part="")  # empty group
@example(character_set=b"ISO_IR 100", name="=Doe", description="CT\\chest", accession="\\", body_part="\t")
def test_ascii_text_read_straight_from_the_wire_reads_as_pydicom_decodes_it(
    lenient_pydicom: None, character_set: bytes, name: str, description: str, accession: str, body_part: str
) -> None:
    """Text values of ASCII bytes are decoded without pydicom's conversion: whatever the character set, padding,
    backslashes, "=" or control characters, the record is the one pydicom's own decoding gives (which would
    warn about the control characters, hence lenient), and a NUL inside a value is refused the same way."""
    raw_values = {
        "SpecificCharacterSet": padded(character_set),
        "PatientName": padded(name.encode()),
        "StudyDescription": padded(description.encode()),
        "AccessionNumber": padded(accession.encode()),
        "BodyPartExamined": padded(body_part.encode()),
    }
    wire = from_wire(make_dataset(), **raw_values)
    decoded_by_pydicom = from_wire(make_dataset(), **raw_values)
    for element in decoded_by_pydicom:  # iterating converts every raw element with pydicom's decoding
        assert not isinstance(element, RawDataElement)

    assert record_or_refusal(wire) == record_or_refusal(decoded_by_pydicom)


def record_or_refusal(ds: Dataset) -> InstanceRecord | str:
    """The record extracted from ``ds``, or the text of the refusal."""
    try:
        return extract_instance(ds)
    except InvalidInstanceError as refusal:
        return str(refusal)
