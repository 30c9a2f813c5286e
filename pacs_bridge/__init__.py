"""pacs-bridge: DICOM C-STORE in, one debounced FHIR ImagingStudy per study out."""

__version__ = "0.1.0"
