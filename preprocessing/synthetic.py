"""Synthetic abdominal CT phantoms in the real datasets' file layouts (quickstart and tests).

Each phantom is built in the display frame (rows anterior → posterior, columns patient right →
left, slices inferior → superior) in HU: air, a body (fat rim, soft tissue), spine, aorta, liver
on the patient's right (image left), spleen, both kidneys, an elongated pancreas anterior to the
spine whose position, length, thickness, tilt and axial extent vary with the seed, and (MSD) a
hypodense tumor inside the pancreas covering only part of its slices. Like patients, phantoms
also differ in body size (the whole anatomy scaled by 0.7–1.1 about the middle of the back,
which lies on the table) and in where the body lies in the field of view (table height and
lateral position, ±4 % of the image), so that organ boxes vary from volume to volume and the
image (body outline, spine, organs) tells where the pancreas is. It is then stored in the
requested orientation (``--orient``, any nibabel axis codes such as RAS, LPS, LAS) with the
matching affine, so the pipeline must undo the orientation from the affine.

Layouts: ``msd`` → ``imagesTr/pancreas_XXX.nii.gz`` + ``labelsTr/`` (1 pancreas, 2 tumor);
``nih`` → ``images/PANCREAS_XXXX/<study>/<series>/1-NNN.dcm`` DICOM series (or NIfTI with
``nih_format='nifti'``) + ``labels/labelXXXX.nii.gz`` (1 pancreas); ``abd`` →
``images/Case_XXXXX_0000.nii.gz`` + ``masks/Case_XXXXX.nii.gz`` (1 liver, 2 kidney, 3 spleen,
4 pancreas).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform

from minigpt4.io import write_bytes_atomic
from minigpt4.nifti_io import write_nifti
from minigpt4 import outputs
from preprocessing.output_folder import PreparationError
from minigpt4.io import write_json_atomic

DISPLAY_CODES = ("P", "L", "S")
LABELS = {
    "msd": {"pancreas": 1, "tumor": 2},
    "nih": {"pancreas": 1},
    "abd": {"liver": 1, "kidney": 2, "spleen": 3, "pancreas": 4},
    # PANORAMA's values (preprocessing.panorama.LABELS): 1 PDAC lesion, 3 arteries, 4 parenchyma, 5 duct
    "panorama": {"tumor": 1, "aorta": 3, "pancreas": 4, "duct": 5},
}


def _paint(image, label, centre, radii, value, label_value=0, angle=0.0, z_range=None):
    """Fill an ellipsoid (in-plane rotated by ``angle`` radians) of a display-frame volume.

    centre/radii are (row, col, slice) in voxels; only the ellipsoid's bounding block is touched.
    Returns the boolean mask of the block and the block's slices (for tumor placement).
    """
    h, w, s = image.shape
    r_max = max(radii[0], radii[1])
    lo = [int(np.floor(centre[0] - r_max)), int(np.floor(centre[1] - r_max)), int(np.floor(centre[2] - radii[2]))]
    hi = [int(np.ceil(centre[0] + r_max)) + 1, int(np.ceil(centre[1] + r_max)) + 1, int(np.ceil(centre[2] + radii[2])) + 1]
    lo = [max(0, v) for v in lo]
    hi = [min(n, v) for n, v in zip((h, w, s), hi)]
    if any(a >= b for a, b in zip(lo, hi)):
        return
    rr = np.arange(lo[0], hi[0], dtype=np.float32)[:, None, None] - centre[0]
    cc = np.arange(lo[1], hi[1], dtype=np.float32)[None, :, None] - centre[1]
    kk = np.arange(lo[2], hi[2], dtype=np.float32)[None, None, :] - centre[2]
    ca, sa = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    u = ca * cc + sa * rr  # along the (tilted) long axis
    v = -sa * cc + ca * rr
    inside = (u / radii[1]) ** 2 + (v / radii[0]) ** 2 + (kk / radii[2]) ** 2 <= 1.0
    block = (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2]))
    image[block][inside] = value
    if label is not None and label_value:
        label[block][inside] = label_value


def phantom(size: int = 128, n_slices: int = 24, seed: int = 0, scheme: str = "msd", tumor=None):
    """One phantom in the display frame.

    Args:
        tumor: paint the hypodense tumor (default: for ``msd`` only). ``panorama`` phantoms also
            label the aorta (arteries) and a hypodense duct inside the pancreas.

    Returns:
        hu (size, size, n_slices) int16, label (size, size, n_slices) uint8 (scheme's label
        numbers), spacing (row mm, col mm, slice mm).
    """
    if scheme not in LABELS:
        raise ValueError(f"unknown scheme {scheme!r}; choose msd, nih, abd or panorama")
    if size < 32 or n_slices < 4:
        raise ValueError(f"phantom too small: size {size} (>= 32), slices {n_slices} (>= 4)")
    rng = np.random.default_rng(seed)
    h = w = size
    s = n_slices
    lab_no = LABELS[scheme]
    image = np.full((h, w, s), -1000.0, dtype=np.float32)
    label = np.zeros((h, w, s), dtype=np.uint8)
    # The patient: body size (scale about the middle of the back at row 0.85, where the body lies
    # on the table) and position in the field of view. |shifts| <= 0.04 keep the vertebra
    # (radius >= 0.042) on the image midline and its top below 0.6 h, the body inside the image.
    # Drawn from their own stream so that the organ draws below are those of the same seed without
    # patient variation (slice extents, tumor placement).
    patient = np.random.default_rng([seed, 1])
    scale = float(patient.uniform(0.7, 1.1))
    shift_r, shift_c = float(patient.uniform(-0.04, 0.04)), float(patient.uniform(-0.04, 0.04))

    def c(fr, fc, fk):  # fractional position in a reference body → voxel centre in this patient
        return ((0.85 + shift_r + scale * (fr - 0.85)) * h, (0.5 + shift_c + scale * (fc - 0.5)) * w, fk * s)

    def r(fr, fc, fk):  # fractional radii → voxels (in-plane radii scale with the body)
        return (scale * fr * h, scale * fc * w, fk * s)

    _paint(image, None, c(0.52, 0.5, 0.5), r(0.33, 0.43, 10.0), -100.0)  # fat rim
    _paint(image, None, c(0.52, 0.5, 0.5), r(0.30, 0.40, 10.0), 30.0)  # soft tissue
    organ = lambda name: lab_no.get(name, 0)  # noqa: E731 - label number or 0 (not labelled)
    jitter = lambda a: float(rng.uniform(-a, a))  # noqa: E731
    _paint(image, label, c(0.42 + jitter(0.02), 0.30 + jitter(0.02), 0.70), r(0.17, 0.16, 0.35), 60.0, organ("liver"))
    _paint(image, label, c(0.55 + jitter(0.02), 0.78 + jitter(0.02), 0.70), r(0.08, 0.07, 0.22), 45.0, organ("spleen"))
    for col in (0.33, 0.67):  # both kidneys; "kidney" in ABD is made of the right one later
        _paint(image, label, c(0.66, col + jitter(0.01), 0.45 + jitter(0.05)), r(0.06, 0.045, 0.18), 150.0, organ("kidney"))
    _paint(image, None, c(0.73, 0.5, 0.5), r(0.06, 0.06, 10.0), 650.0)  # vertebra
    _paint(image, label, c(0.61, 0.54, 0.5), r(0.025, 0.025, 10.0), 180.0, organ("aorta"))
    # Pancreas: elongated, draped over the aorta and spine, tilted (tail up towards the spleen on
    # the image right); its size, tilt and position relative to the spine vary too.
    p_centre = c(0.53 + jitter(0.03), 0.52 + jitter(0.03), 0.5 + jitter(0.12))
    p_radii = r(float(rng.uniform(0.025, 0.045)), float(rng.uniform(0.12, 0.18)), float(rng.uniform(0.12, 0.25)))
    angle = float(rng.uniform(-0.45, 0.1))
    _paint(image, label, p_centre, p_radii, 110.0, organ("pancreas"), angle=angle)
    if organ("duct"):  # a thin fluid-filled duct along the gland's long axis (draws nothing from rng)
        d_radii = (max(0.6, 0.2 * p_radii[0]), 0.8 * p_radii[1], 0.8 * p_radii[2])
        _paint(image, label, p_centre, d_radii, 5.0, organ("duct"), angle=angle)
    if scheme == "msd" if tumor is None else tumor:
        t = float(rng.uniform(-0.5, 0.5)) * p_radii[1]
        t_centre = (p_centre[0] + np.sin(angle) * t, p_centre[1] + np.cos(angle) * t, p_centre[2] + jitter(0.3) * p_radii[2])
        t_r = float(rng.uniform(0.7, 1.0)) * p_radii[0]
        _paint(image, label, t_centre, (t_r, t_r, max(1.0, 0.45 * p_radii[2])), 15.0, organ("tumor"))
    image += rng.standard_normal(image.shape, dtype=np.float32) * np.float32(12.0)
    spacing = (400.0 / h, 400.0 / w, max(1.0, 250.0 / s))
    return np.clip(np.rint(image), -1024, 3071).astype(np.int16), label, spacing


def display_affine(shape, spacing) -> np.ndarray:
    """RAS affine of a display-frame array: rows → posterior, columns → patient's left."""
    h, w, s = shape
    aff = np.zeros((4, 4))
    aff[0, 1] = -spacing[1]  # column index → toward the patient's left (−x in RAS)
    aff[1, 0] = -spacing[0]  # row index → posterior (−y)
    aff[2, 2] = spacing[2]
    aff[:3, 3] = (w * spacing[1] / 2, h * spacing[0] / 2 + 100.0, -s * spacing[2] / 2)
    aff[3, 3] = 1.0
    return aff


def stored(array: np.ndarray, spacing, orient: str) -> tuple[np.ndarray, np.ndarray]:
    """Display-frame array → (array in orientation ``orient``, its RAS affine)."""
    codes = tuple(orient.upper())
    if len(codes) != 3:
        raise ValueError(f"--orient needs 3 axis codes such as RAS or LPS, got {orient!r}")
    try:
        transform = ornt_transform(axcodes2ornt(DISPLAY_CODES), axcodes2ornt(codes))
    except ValueError as err:
        raise ValueError(f"invalid --orient {orient!r}: {err}") from None
    out = np.ascontiguousarray(apply_orientation(array, transform))
    affine = display_affine(array.shape, spacing) @ inv_ornt_aff(transform, array.shape)
    return out, affine


COPY_VARIANTS = ("renamed", "reoriented", "noise_0.4HU", "slice_dropped", "offset_1HU", "mirrored_voxels",
                 "spacing_6.26", "exact")
"""How another dataset may hold the same scan (what ``abd --exclude-overlap-with`` must still find)."""


def modified_copy(variant: str, hu: np.ndarray, spacing, seed: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """A stored copy ``(array, affine)`` of a display-frame phantom as :data:`COPY_VARIANTS` says:
    the RAS-stored original (``exact``, ``renamed``: a name is not content), stored ``SLP``
    (``reoriented``: other axis order and directions, the affine saying so), float32 with
    N(0, 0.4²) HU added, the middle slice deleted, +1 HU, mirrored along the first axis with the
    affine unchanged, or the first axis' spacing ×6.26/6.25 in the header."""
    arr, affine = stored(hu, spacing, "RAS")
    if variant == "reoriented":
        return stored(hu, spacing, "SLP")
    if variant == "noise_0.4HU":
        noise = np.random.default_rng(seed).normal(0, 0.4, arr.shape).astype(np.float32)
        return arr.astype(np.float32) + noise, affine
    if variant == "slice_dropped":
        return np.delete(arr, arr.shape[2] // 2, axis=2), affine
    if variant == "offset_1HU":
        return arr + np.int16(1), affine
    if variant == "mirrored_voxels":
        return arr[::-1].copy(), affine
    if variant == "spacing_6.26":
        return arr, affine @ np.diag([6.26 / 6.25, 1.0, 1.0, 1.0])
    if variant in ("exact", "renamed"):
        return arr, affine
    raise ValueError(f"unknown copy variant {variant!r}; choose one of {COPY_VARIANTS}")


def write_dicom_series(folder: Path, hu: np.ndarray, spacing, patient: str, seed: int) -> None:
    """Display-frame HU volume → axial DICOM series (uint16 + RescaleIntercept −1024).

    A standard axial series (ImageOrientationPatient 1,0,0,0,1,0) stores pixels exactly in the
    display frame. Files are numbered from the top (most superior slice = ``1-001.dcm``), as
    TCIA does, so readers must sort by geometry rather than by name.
    """
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    h, w, s = hu.shape
    aff = display_affine(hu.shape, spacing)
    study = generate_uid(entropy_srcs=[patient, str(seed), "study"])
    series = generate_uid(entropy_srcs=[patient, str(seed), "series"])
    frame_of_reference = generate_uid(entropy_srcs=[patient, str(seed), "frame"])  # a DICOM SEG refers to it
    stored_px = np.clip(hu.astype(np.int32) + 1024, 0, 65535).astype(np.uint16)
    series_dir = folder / "study" / "series"
    for k in range(s):
        ras = aff @ np.array([0.0, 0.0, k, 1.0])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[patient, str(seed), str(k)])
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.PatientID, ds.PatientName = patient, f"Synthetic^{patient}"
        ds.FrameOfReferenceUID = frame_of_reference
        ds.Modality = "CT"
        ds.InstanceNumber = s - k
        ds.ImagePositionPatient = [f"{-ras[0]:.4f}", f"{-ras[1]:.4f}", f"{ras[2]:.4f}"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [f"{spacing[0]:.6f}", f"{spacing[1]:.6f}"]
        ds.SliceThickness = f"{spacing[2]:.4f}"
        ds.Rows, ds.Columns = h, w
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope = "-1024", "1"
        ds.PixelData = np.ascontiguousarray(stored_px[:, :, k]).tobytes()
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        write_bytes_atomic(series_dir / f"1-{s - k:03d}.dcm", buf.getvalue())


def _planned_files(scheme: str, n: int, n_slices: int, nih_format: str) -> list[str]:
    """Relative paths :func:`generate` writes, in writing order."""
    files = []
    for i in range(1, n + 1):
        if scheme == "msd":
            files += [f"imagesTr/pancreas_{i:03d}.nii.gz", f"labelsTr/pancreas_{i:03d}.nii.gz"]
        elif scheme == "nih":
            if nih_format == "dicom":
                files += [f"images/PANCREAS_{i:04d}/study/series/1-{n_slices - k:03d}.dcm" for k in range(n_slices)]
            else:
                files.append(f"images/PANCREAS_{i:04d}.nii.gz")
            files.append(f"labels/label{i:04d}.nii.gz")
        else:
            files += [f"images/Case_{i:05d}_0000.nii.gz", f"masks/Case_{i:05d}.nii.gz"]
    return files


def _start_output(out: Path, planned: list[str], overwrite: bool) -> set[str]:
    """The rules of every output folder (:func:`minigpt4.outputs.check_output_folder`):
    returns the files an earlier ``generate`` wrote here (its ``manifest.json`` lists them);
    refuses a non-empty folder without that manifest unless ``overwrite``, and never replaces
    a file it did not write."""
    try:
        old = outputs.check_output_folder(out, "preprocessing synthetic", lambda m: m.get("dataset") == "synthetic",
                                          overwrite, owner="python -m preprocessing synthetic")
    except outputs.OutputFolderError as err:
        raise PreparationError(str(err)) from None
    owned = {f for f in (old or {}).get("files", []) if (out / f).is_file()}
    foreign = [f for f in planned if f not in owned and (out / f).exists()]
    if foreign:
        raise PreparationError(f"{out}: would replace {len(foreign)} file(s) it did not write "
                               f"({', '.join(foreign[:5])}); move them away or choose another --out")
    return owned


def generate(out, scheme: str = "msd", n: int = 12, n_slices: int = 24, size: int = 128,
             orient: str = "RAS", seed: int = 0, nih_format: str = "dicom", log=print,
             overwrite: bool = False) -> dict:
    """Write ``n`` phantoms in ``scheme``'s layout under ``out`` (+ ``manifest.json`` listing them).

    A re-run into the same folder replaces and removes only the files its manifest lists.

    Returns:
        ``{"images": folder, "labels": folder, "volumes": [names]}`` (the arguments for
        ``python -m preprocessing <scheme>``).
    """
    out = Path(out)
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    names = []
    if scheme == "msd":
        img_dir, lab_dir = out / "imagesTr", out / "labelsTr"
    elif scheme == "nih":
        img_dir, lab_dir = out / "images", out / "labels"
    elif scheme == "abd":
        img_dir, lab_dir = out / "images", out / "masks"
    else:
        raise ValueError(f"unknown scheme {scheme!r}; choose msd, nih, abd or panorama")
    planned = _planned_files(scheme, n, n_slices, nih_format)
    owned = _start_output(out, planned, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "manifest.json", {"dataset": "synthetic", "status": "incomplete",
                                              "files": sorted(owned | set(planned))})
    for i in range(1, n + 1):
        hu, label, spacing = phantom(size, n_slices, seed=seed * 100003 + i, scheme=scheme)
        lab_arr, lab_aff = stored(label, spacing, orient)
        if scheme == "msd":
            name = f"pancreas_{i:03d}"
            img_arr, img_aff = stored(hu, spacing, orient)
            write_nifti(img_dir / f"{name}.nii.gz", img_arr, img_aff)
            write_nifti(lab_dir / f"{name}.nii.gz", lab_arr, lab_aff)
        elif scheme == "nih":
            name = f"PANCREAS_{i:04d}"
            if nih_format == "dicom":
                write_dicom_series(img_dir / name, hu, spacing, name, seed)
            else:
                img_arr, img_aff = stored(hu, spacing, orient)
                write_nifti(img_dir / f"{name}.nii.gz", img_arr, img_aff)
            write_nifti(lab_dir / f"label{i:04d}.nii.gz", lab_arr, lab_aff)
        else:
            name = f"Case_{i:05d}"
            img_arr, img_aff = stored(hu, spacing, orient)
            write_nifti(img_dir / f"{name}_0000.nii.gz", img_arr, img_aff)
            write_nifti(lab_dir / f"{name}.nii.gz", lab_arr, lab_aff)
        names.append(name)
    for rel in sorted(owned - set(planned)):  # files of an earlier, larger run
        path = out / rel
        path.unlink()
        for parent in path.parents:  # and the folders that held only them (DICOM series)
            if parent == out or any(parent.iterdir()):
                break
            parent.rmdir()
    write_json_atomic(out / "manifest.json", {
        "dataset": "synthetic", "status": "complete",
        "parameters": {"scheme": scheme, "n": n, "slices": n_slices, "size": size, "orient": orient,
                       "seed": seed, "nih_format": nih_format},
        "files": sorted(planned)})
    log(f"wrote {n} {scheme} phantoms ({size}x{size}x{n_slices}, {orient}) to {out}")
    return {"images": str(img_dir), "labels": str(lab_dir), "volumes": names}
