"""What the C-FIND source asks for and how it merges the levels' answers into one instance's dataset."""

from __future__ import annotations

import itertools

from pydicom.dataset import Dataset

from pacs_bridge.backfill.dimse import RETURN_KEYS, find_identifier, merged_instance
from pacs_bridge.dicom.extract import HEADER_KEYWORDS, extract_instance


def test_every_element_the_mapping_reads_is_asked_at_some_level() -> None:
    """The study, series and image return keys together are extract.HEADER_KEYWORDS (but the character set,
    which comes with every answer)."""
    asked = set(itertools.chain(*RETURN_KEYS.values())) - {"ModalitiesInStudy"}
    assert asked == set(HEADER_KEYWORDS) - {"SpecificCharacterSet"}


def test_an_identifier_asks_for_its_return_keys_and_matches_on_the_given_values() -> None:
    """Return keys are empty (sequences too); match keys carry their value."""
    identifier = find_identifier("SERIES", StudyInstanceUID="1.2.3")

    assert identifier.QueryRetrieveLevel == "SERIES"
    assert identifier.StudyInstanceUID == "1.2.3"
    assert identifier.SeriesInstanceUID == ""
    assert list(identifier.RequestAttributesSequence) == []


def test_merged_levels_decode_each_answer_with_its_own_character_set() -> None:
    """A study answer in Latin-1 and an image answer in UTF-8 give one instance with the right names."""
    study = Dataset()
    study.SpecificCharacterSet = "ISO_IR 100"
    study.add_new(0x00100010, "PN", "Müller^Jürgen".encode("latin-1"))
    study.StudyInstanceUID = "1.2.3"
    study.QueryRetrieveLevel = "STUDY"
    study.RetrieveAETitle = "PACS"
    series = Dataset()
    series.SpecificCharacterSet = "ISO_IR 192"
    series.SeriesInstanceUID = "1.2.3.1"
    series.Modality = "MR"
    series.add_new(0x0008103E, "LO", "Kopf ñ".encode())
    image = Dataset()
    image.SOPInstanceUID = "1.2.3.1.1"
    image.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    image.InstanceNumber = "7"

    record = extract_instance(merged_instance(study, series, image))

    assert record.study.patient_name == "Müller^Jürgen"
    assert (record.series.modality, record.series.series_description) == ("MR", "Kopf ñ")
    assert (record.sop_instance_uid, record.instance_number) == ("1.2.3.1.1", 7)
