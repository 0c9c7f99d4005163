"""Realistic synthetic studies for `kho bench` when an admin has no corpus at hand.

A CT series of an elliptical body (skin, fat, muscle, lungs with vessels, spine, ribs,
organs) whose anatomy changes smoothly along the slices, with CT-like noise; stored as
unsigned 12-bit values with Rescale Intercept -1024, as most scanners write them.  Not
constant, not random: compression figures on it are close to those on real CT.
"""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def ct_slice_hu(
    index: int, count: int, rows: int = 512, cols: int = 512, seed: int = 0
) -> np.ndarray:
    """One axial slice in Hounsfield units (int16)."""
    rng = np.random.default_rng(seed * 100_003 + index)
    z = index / max(1, count - 1)  # 0 at the lung apex, 1 at the abdomen
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    cy, cx = rows / 2, cols / 2
    ry, rx = rows * (0.30 + 0.04 * np.sin(np.pi * z)), cols * 0.42
    r = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
    hu = np.full((rows, cols), -1000.0, dtype=np.float32)  # air
    hu[r < 1.0] = -90.0  # subcutaneous fat
    hu[r < 0.82] = 45.0  # muscle and soft tissue
    # lungs shrink towards the abdomen; vessels inside them
    lung_size = max(0.0, 1.0 - 1.4 * z)
    for side in (-1, 1):
        ly = ((yy - cy + rows * 0.02) / (ry * 0.62 * (0.3 + lung_size))) ** 2
        lx = ((xx - cx - side * cols * 0.17) / (rx * 0.33)) ** 2
        lung = (ly + lx) < 1.0
        hu[lung] = -850.0 + 40.0 * np.sin(xx[lung] / 9.0) * np.cos(yy[lung] / 11.0)
    vessels = (np.sin(xx / 7.3 + index * 0.2) * np.sin(yy / 6.1) > 0.93) & (hu < -500)
    hu[vessels] = 30.0
    # liver / organs appear lower down
    if z > 0.4:
        organ = (((yy - cy) / (ry * 0.5)) ** 2 + ((xx - cx + cols * 0.12) / (rx * 0.45)) ** 2) < z
        hu[organ & (r < 0.8)] = 60.0
    # spine (vertebral body and canal) and ribs
    spine = ((yy - cy - ry * 0.62) / (rows * 0.055)) ** 2 + ((xx - cx) / (cols * 0.05)) ** 2 < 1
    hu[spine] = 700.0 + 200.0 * np.cos(index / 3.0)
    canal = ((yy - cy - ry * 0.45) / (rows * 0.02)) ** 2 + ((xx - cx) / (cols * 0.02)) ** 2 < 1
    hu[canal] = 20.0
    ribs = (np.abs(r - 0.9) < 0.02) & (np.sin(np.arctan2(yy - cy, xx - cx) * 9 + index / 4) > 0.2)
    hu[ribs] = 900.0
    # smooth the edges a little (partial volume), then CT noise
    smooth = (hu + np.roll(hu, 1, 0) + np.roll(hu, 1, 1) + np.roll(hu, (1, 1), (0, 1))) / 4
    smooth += rng.normal(0.0, 12.0, hu.shape)
    smooth[r >= 1.06] = -1000.0 + rng.normal(0.0, 4.0, int((r >= 1.06).sum()))
    return np.clip(np.round(smooth), -1024, 3071).astype(np.int16)


def ct_series_datasets(
    count: int = 300,
    *,
    rows: int = 512,
    cols: int = 512,
    seed: int = 0,
    patient: str = "PHANTOM^CT",
) -> list[bytes]:
    """A whole CT series as Part 10 bytes (explicit VR little endian, 12 bits stored)."""
    study_uid, series_uid = generate_uid(), generate_uid()
    frame_of_reference = generate_uid()
    out = []
    for i in range(count):
        ds = Dataset()
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = generate_uid()
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20260115"
        ds.StudyTime = ds.SeriesTime = "101500"
        ds.AccessionNumber = f"ACC{seed:06d}"
        ds.Modality = "CT"
        ds.Manufacturer = "kho phantom"
        ds.ReferringPhysicianName = "WHO^REFERS"
        ds.StudyDescription = "CT CHEST ABDOMEN"
        ds.SeriesDescription = "AXIAL 1.0"
        ds.PatientName = patient
        ds.PatientID = f"PH{seed:06d}"
        ds.PatientBirthDate = "19600101"
        ds.PatientSex = "O"
        ds.BodyPartExamined = "CHEST"
        ds.SliceThickness = "1.0"
        ds.KVP = "120"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = 2
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [-250.0, -250.0, -float(i)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.FrameOfReferenceUID = frame_of_reference
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = rows, cols
        ds.PixelSpacing = [0.9765625, 0.9765625]
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        stored = (ct_slice_hu(i, count, rows, cols, seed).astype(np.int32) + 1024).astype(np.uint16)
        ds.PixelData = stored.tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        buffer = BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        out.append(buffer.getvalue())
    return out


def write_ct_series(folder: Path, count: int = 300, **kwargs: object) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, data in enumerate(ct_series_datasets(count, **kwargs)):  # type: ignore[arg-type]
        path = folder / f"CT{i + 1:04d}.dcm"
        path.write_bytes(data)
        paths.append(path)
    return paths
