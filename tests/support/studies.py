"""Generate DICOM test data in code with pydicom: minimal datasets and whole multi-series studies on disk."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian

ROOT = "1.2.826.0.1.3680043.10.1482."  # test-data prefix under pydicom's UID root


def uid(suffix: str) -> str:
    """A deterministic, valid test UID."""
    return ROOT + suffix


def make_dataset(**overrides: Any) -> Dataset:
    """The smallest CT dataset the bridge indexes; keyword overrides replace (or, with None, delete) elements."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = uid("3.1.1")
    ds.StudyDate = "20240315"
    ds.StudyTime = "101530"
    ds.SeriesDate = "20240315"
    ds.SeriesTime = "101600"
    ds.AccessionNumber = "ACC-0001"
    ds.Modality = "CT"
    ds.StudyDescription = "CT chest"
    ds.SeriesDescription = "Axial 5mm"
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "PAT-0001"
    ds.StudyInstanceUID = uid("1")
    ds.SeriesInstanceUID = uid("2.1")
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    for keyword, value in overrides.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


@dataclass(frozen=True)
class SeriesSpec:
    modality: str
    instances: int
    description: str = ""


def study_datasets(
    study_uid: str,
    series: list[SeriesSpec],
    *,
    pixel_bytes: int = 8192,
    patient_id: str = "PAT-0001",
    accession: str = "ACC-0001",
    first_series_number: int = 1,
) -> Iterator[Dataset]:
    """Every instance of a generated study, with ``pixel_bytes`` of (never decoded) pixel data each."""
    side = max(int((pixel_bytes // 2) ** 0.5), 1)
    pixels = bytes(side * side * 2)
    for series_index, spec in enumerate(series):
        number = first_series_number + series_index
        series_uid = f"{study_uid}.{number}"
        for instance_number in range(1, spec.instances + 1):
            ds = make_dataset(
                StudyInstanceUID=study_uid,
                SeriesInstanceUID=series_uid,
                SOPInstanceUID=f"{series_uid}.{instance_number}",
                Modality=spec.modality,
                SeriesNumber=number,
                SeriesDescription=spec.description or f"{spec.modality} series {number}",
                InstanceNumber=instance_number,
                PatientID=patient_id,
                AccessionNumber=accession,
            )
            ds.Rows = side
            ds.Columns = side
            ds.BitsAllocated = 16
            ds.BitsStored = 12
            ds.HighBit = 11
            ds.PixelRepresentation = 0
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.PixelData = pixels
            yield ds


def write_file(ds: Dataset, path: Path) -> Path:
    """Write ``ds`` as a DICOM Part 10 file (Explicit VR Little Endian)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_study(directory: Path, study_uid: str, series: list[SeriesSpec], **kwargs: Any) -> list[Path]:
    """Write a generated study into ``directory`` (one file per instance); returns the paths in send order."""
    paths = []
    for ds in study_datasets(study_uid, series, **kwargs):
        paths.append(write_file(ds, directory / f"{ds.SOPInstanceUID}.dcm"))
    return paths


def new_study_uid() -> str:
    """A fresh study UID short enough (46 characters) to carry series and instance suffixes within 64."""
    return ROOT + "9." + str(random.SystemRandom().randrange(10**13, 10**14))
