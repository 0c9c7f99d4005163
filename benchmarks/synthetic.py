"""Realistic synthetic images and DICOM files for benchmarks (codecs, ingest, DICOMweb).

Not constant and not random noise: anatomy-like structure (body outline, fat, soft tissue,
lungs with vessels, spine, ribs, organs) that changes smoothly from slice to slice, plus
scanner-like noise, so that compression ratios and speeds land near those of real images.

- ``ct_slice`` / ``ct_series``: Hounsfield units (int16, air -1000);
  ``ct_stored`` turns HU into the usual stored form (uint16, Rescale Intercept -1024,
  12 bits stored).
- ``radiograph``: a chest-like projection image (uint16, 12 bits by default).
- ``write_ct_series`` / ``write_radiograph``: Part 10 files (explicit VR little endian).
"""

from __future__ import annotations

import datetime
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
DX_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - Presentation
CT_RESCALE_INTERCEPT = -1024
CT_BITS_STORED = 12


def _ellipse(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float):
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2


def ct_slice(index: int, rows: int = 512, cols: int = 512, seed: int = 0) -> np.ndarray:
    """One axial CT slice in Hounsfield units (int16).  ``index`` moves down the body
    (0: lung apex, ~150: lung bases, ~300: abdomen); neighbouring slices look alike."""
    rng = np.random.default_rng(seed * 1_000_003 + index)
    z = min(1.0, max(0.0, index / 300.0))
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    scale_y, scale_x = rows / 512.0, cols / 512.0
    cy, cx = rows * 0.52, cols * 0.5
    ry = rows * (0.30 + 0.03 * np.sin(np.pi * z))
    rx = cols * (0.40 + 0.02 * np.cos(np.pi * z))
    body = _ellipse(yy, xx, cy, cx, ry, rx)
    hu = np.full((rows, cols), -1000.0, np.float32)
    # table under the patient
    table = (yy > cy + ry + 18 * scale_y) & (yy < cy + ry + 26 * scale_y)
    hu[table] = 200.0
    hu[body < 1.0] = -100.0  # subcutaneous fat
    inner = body < 0.80
    # soft tissue with slow texture (muscle, organs)
    hu[inner] = 40.0 + 8.0 * np.sin(xx[inner] / (23 * scale_x)) * np.cos(yy[inner] / (31 * scale_y))
    # lungs: large at the apex/middle, gone in the abdomen
    lung_size = max(0.0, np.sin(np.pi * min(1.0, z * 1.6)) * 0.9 + 0.1) if z < 0.6 else 0.0
    if lung_size > 0:
        for side in (-1, 1):
            lung = (
                _ellipse(
                    yy,
                    xx,
                    cy - 0.05 * ry,
                    cx + side * 0.42 * rx,
                    0.62 * ry * lung_size,
                    0.36 * rx * (0.6 + 0.4 * lung_size),
                )
                < 1.0
            ) & inner
            texture = 25.0 * np.sin(xx / (9 * scale_x) + index * 0.05) * np.cos(yy / (11 * scale_y))
            hu[lung] = -860.0 + texture[lung]
            vessels = lung & (
                np.sin(xx / (6.3 * scale_x) + index * 0.11)
                * np.sin(yy / (5.7 * scale_y) - index * 0.07)
                > 0.9
            )
            hu[vessels] = 35.0
        # heart between the lungs
        heart = _ellipse(yy, xx, cy - 0.1 * ry, cx + 0.12 * rx, 0.45 * ry, 0.28 * rx) < 1.0
        hu[heart & inner] = 45.0 + 10.0 * (1 - z)
    if z > 0.45:  # liver, kidneys
        liver = _ellipse(yy, xx, cy - 0.15 * ry, cx - 0.35 * rx, 0.5 * ry, 0.4 * rx) < (z - 0.4)
        hu[liver & inner] = 62.0
        for side in (-1, 1):
            kidney = _ellipse(yy, xx, cy + 0.45 * ry, cx + side * 0.35 * rx, 0.12 * ry, 0.08 * rx)
            hu[(kidney < 1.0) & inner] = 150.0  # contrast-enhanced cortex
    # aorta
    hu[_ellipse(yy, xx, cy + 0.35 * ry, cx - 0.06 * rx, 14 * scale_y, 14 * scale_x) < 1.0] = 180.0
    # spine: vertebral body (cortical rim, cancellous inside), canal, posterior elements
    sy, sx = cy + 0.62 * ry, cx
    vert = _ellipse(yy, xx, sy, sx, 30 * scale_y, 28 * scale_x)
    hu[vert < 1.0] = 1100.0
    hu[vert < 0.7] = 250.0 + 60.0 * np.cos(index / 5.0)
    canal = _ellipse(yy, xx, sy + 38 * scale_y, sx, 11 * scale_y, 12 * scale_x) < 1.0
    process = _ellipse(yy, xx, sy + 52 * scale_y, sx, 20 * scale_y, 6 * scale_x) < 1.0
    hu[process] = 900.0
    hu[canal] = 15.0
    # ribs: short arcs near the body wall, spaced along z (each rib crosses a few slices)
    if z < 0.7:
        angle = np.arctan2(yy - cy, xx - cx)
        rib_ring = np.abs(body - 0.86) < 0.025
        phase = np.sin(angle * 7.0 + index * 0.35)
        hu[rib_ring & (phase > 0.55)] = 1000.0
    # partial volume: a small box blur, then quantum noise (more in the body than in air)
    blurred = (hu + np.roll(hu, 1, 0) + np.roll(hu, 1, 1) + np.roll(hu, (1, 1), (0, 1))) / 4.0
    sigma = np.where(body < 1.0, 14.0, 5.0).astype(np.float32)
    blurred += rng.standard_normal((rows, cols), dtype=np.float32) * sigma
    outside = (body >= 1.08) & ~table
    blurred[outside] = -1000.0 + rng.standard_normal(int(outside.sum()), dtype=np.float32) * 3.0
    return np.clip(np.rint(blurred), -1024, 3071).astype(np.int16)


def ct_stored(hu: np.ndarray) -> np.ndarray:
    """HU -> stored values: uint16, Rescale Intercept -1024, 12 bits stored (0..4095)."""
    stored = hu.astype(np.int32) - CT_RESCALE_INTERCEPT
    return np.clip(stored, 0, (1 << CT_BITS_STORED) - 1).astype(np.uint16)


def ct_series(n: int = 300, rows: int = 512, cols: int = 512, seed: int = 0) -> list[np.ndarray]:
    """``n`` consecutive slices in HU (int16), spread over the chest and upper abdomen."""
    step = 300.0 / max(1, n)
    return [ct_slice(round(i * step), rows, cols, seed) for i in range(n)]


def radiograph(rows: int = 3000, cols: int = 2500, bits: int = 12, seed: int = 0) -> np.ndarray:
    """A chest PA-like radiograph (uint16, values < 2**bits): bright where attenuating
    (MONOCHROME2), dark lungs, ribs, mediastinum, collimation edges, quantum noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    ny, nx = yy / rows, xx / cols
    # attenuation in arbitrary units: soft tissue of the trunk, shoulders
    trunk = np.clip(1.0 - _ellipse(ny, nx, 0.58, 0.5, 0.55, 0.42), 0.0, 1.0) ** 0.5
    atten = 0.15 + 0.55 * trunk
    lungs = np.zeros_like(ny)
    for side in (-1, 1):
        lung = np.clip(1.0 - _ellipse(ny, nx, 0.47, 0.5 + side * 0.18, 0.27, 0.12), 0.0, 1.0)
        lungs = np.maximum(lungs, lung**0.6)
    atten -= 0.35 * lungs
    # mediastinum and heart, spine
    atten += 0.25 * np.clip(1.0 - _ellipse(ny, nx, 0.55, 0.52, 0.28, 0.09), 0.0, 1.0) ** 0.5
    atten += 0.2 * np.clip(1.0 - _ellipse(ny, nx, 0.66, 0.56, 0.14, 0.12), 0.0, 1.0) ** 0.5
    atten += 0.12 * np.exp(-(((nx - 0.5) / 0.03) ** 2))
    # ribs: curved bands across each hemithorax
    for side in (-1, 1):
        dx = np.abs(nx - 0.5) * 2.0
        curve = ny - 0.22 - 0.25 * dx**2
        ribs = (np.sin(curve * 2 * np.pi * 11.0) > 0.55) & (dx > 0.08) & (dx < 0.8) & (curve < 0.5)
        ribs &= (nx - 0.5) * side > 0
        atten += 0.08 * ribs
    # clavicles and fine lung texture
    atten += 0.1 * (np.abs(ny - 0.2 - 0.1 * np.abs(nx - 0.5)) < 0.012) * (np.abs(nx - 0.5) < 0.3)
    atten += 0.02 * np.sin(xx / 7.0) * np.sin(yy / 9.0) * lungs
    # smooth anatomical edges, then map to detector values with quantum noise
    kernel = 5
    for axis in (0, 1):
        acc = np.zeros_like(atten)
        for shift in range(-kernel, kernel + 1):
            acc += np.roll(atten, shift, axis)
        atten = acc / (2 * kernel + 1)
    maxval = (1 << bits) - 1
    signal = maxval * (0.08 + 0.8 * np.clip(atten, 0.0, 1.1) / 1.1)
    noise = rng.standard_normal((rows, cols), dtype=np.float32) * np.sqrt(signal) * 0.35
    image = signal + noise
    # collimation: the unexposed border reads low and flat
    collimated = (ny < 0.03) | (ny > 0.97) | (nx < 0.04) | (nx > 0.96)
    image[collimated] = maxval * 0.02 + rng.standard_normal(int(collimated.sum())) * 1.5
    return np.clip(np.rint(image), 0, maxval).astype(np.uint16)


def _base_dataset(sop_class: str, study_uid: str, patient: str, patient_id: str) -> Dataset:
    now = datetime.datetime(2026, 1, 15, 10, 15, 0)
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.AccessionNumber = "ACC" + patient_id[-6:]
    ds.Manufacturer = "kho synthetic"
    ds.ReferringPhysicianName = "REFERRING^DOCTOR"
    ds.PatientName = patient
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.StudyID = "1"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.PixelRepresentation = 0
    return ds


def _save(ds: Dataset, path: Path) -> Path:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_ct_series(
    folder: str | Path,
    n: int = 300,
    study_uid: str | None = None,
    *,
    rows: int = 512,
    cols: int = 512,
    seed: int = 0,
    patient_name: str = "SYNTHETIC^CT",
    patient_id: str = "SYN000001",
    slice_thickness: float = 1.0,
) -> list[Path]:
    """Write a CT series (CT Image Storage, 12 bits stored, Rescale Intercept -1024) as
    ``CT0001.dcm``...; returns the paths in slice order."""
    folder = Path(folder)
    study_uid = study_uid or generate_uid()
    series_uid, frame_of_reference = generate_uid(), generate_uid()
    paths = []
    for i, hu in enumerate(ct_series(n, rows, cols, seed)):
        ds = _base_dataset(CT_IMAGE_STORAGE, study_uid, patient_name, patient_id)
        ds.Modality = "CT"
        ds.StudyDescription = "CT CHEST ABDOMEN"
        ds.SeriesDescription = f"AXIAL {slice_thickness:g}mm"
        ds.BodyPartExamined = "CHEST"
        ds.KVP = "120"
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = 2
        ds.InstanceNumber = i + 1
        ds.FrameOfReferenceUID = frame_of_reference
        ds.ImagePositionPatient = [-250.0, -250.0, round(-i * slice_thickness, 3)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceLocation = round(-i * slice_thickness, 3)
        ds.SliceThickness = f"{slice_thickness:g}"
        ds.PixelSpacing = [round(500.0 / cols, 6), round(500.0 / rows, 6)]
        ds.Rows, ds.Columns = rows, cols
        ds.BitsStored = CT_BITS_STORED
        ds.HighBit = CT_BITS_STORED - 1
        ds.RescaleIntercept = str(CT_RESCALE_INTERCEPT)
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        ds.PixelData = ct_stored(hu).tobytes()
        paths.append(_save(ds, folder / f"CT{i + 1:04d}.dcm"))
    return paths


def write_radiograph(
    path: str | Path,
    *,
    rows: int = 3000,
    cols: int = 2500,
    bits: int = 12,
    seed: int = 0,
    study_uid: str | None = None,
    patient_name: str = "SYNTHETIC^DX",
    patient_id: str = "SYN000002",
) -> Path:
    """Write a chest PA radiograph (DX Image Storage for presentation, ``bits`` stored)."""
    ds = _base_dataset(DX_IMAGE_STORAGE, study_uid or generate_uid(), patient_name, patient_id)
    ds.Modality = "DX"
    ds.StudyDescription = "XR CHEST PA"
    ds.SeriesDescription = "PA"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.ImagerPixelSpacing = [0.143, 0.143]
    ds.PixelSpacing = [0.143, 0.143]
    ds.Rows, ds.Columns = rows, cols
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.WindowCenter = str((1 << bits) // 2)
    ds.WindowWidth = str(1 << bits)
    ds.PixelIntensityRelationship = "LIN"
    ds.PixelData = radiograph(rows, cols, bits, seed).tobytes()
    return _save(ds, Path(path))


XA_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.12.1"  # X-Ray Angiographic Image Storage


def write_multiframe(
    path: str | Path,
    *,
    frames: int = 40,
    rows: int = 512,
    cols: int = 512,
    seed: int = 0,
    study_uid: str | None = None,
    patient_name: str = "SYNTHETIC^XA",
    patient_id: str = "SYN000003",
) -> Path:
    """Write a multi-frame angiographic run (XA, 8 bits, ``frames`` frames): CT-like
    anatomy moving a little from frame to frame, as a cine loop does."""
    ds = _base_dataset(XA_IMAGE_STORAGE, study_uid or generate_uid(), patient_name, patient_id)
    ds.Modality = "XA"
    ds.StudyDescription = "XA CORONARY"
    ds.SeriesDescription = "LAO 30"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.NumberOfFrames = frames
    ds.FrameTime = "66.7"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    # 8-bit frames from a slowly moving window onto the CT phantom (HU -1000..1000)
    phases = [ct_slice(60 + phase, rows, cols, seed) for phase in range(min(frames, 20))]
    cine = np.stack([phases[i % len(phases)] for i in range(frames)]).astype(np.int32)
    stack = np.clip((cine + 1000) * 255 // 2000, 0, 255)
    ds.PixelData = stack.astype(np.uint8).tobytes()
    return _save(ds, Path(path))
