"""jepa-ray: multimodal JEPA pretraining on DICOM images and EHR records, on Ray."""

__version__ = "0.1.0"
