"""``python -m preprocessing panorama`` on the 12 real PANORAMA label volumes and the real sheet
(../shared/data/panorama; RAS, LPS and LAI storage, float64 and uint16 voxels, sform_code 0).

For every label file a synthetic CT is written in that label's exact geometry (its own header:
shape, affine, qform/sform codes; HU by label value plus noise), the pairs are prepared in one
run, and every slice's pancreas (labels 1 | 4 | 5) and tumor (label 1) boxes are compared with a
computation made here from the label file alone in world coordinates: a voxel's column is its
distance from the patient's right edge of the grid (RAS x decreasing), its row its distance from
the anterior edge (y decreasing), its slice its index along the stored axial axis.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from preprocessing.__main__ import main as preprocessing_main
from tests._phantoms import SHARED_DATA

PANORAMA = SHARED_DATA / "panorama"
SHEET = PANORAMA / "clinical_information.xlsx"
LABEL_FILES = sorted(PANORAMA.glob("*_labels/*.nii.gz")) if PANORAMA.is_dir() else []
needs_panorama = pytest.mark.skipif(not SHEET.is_file() or len(LABEL_FILES) < 12,
                                    reason=f"the real PANORAMA labels are not in {PANORAMA} (see ../shared/data/README.md)")
HU = {0: -20, 1: 40, 2: 160, 3: 250, 4: 110, 5: 5, 6: 15}  # background soft tissue, lesion darker than parenchyma
WINDOW = (-150.0, 250.0)

pytestmark = [needs_panorama, pytest.mark.slow]


def _study(path: Path) -> str:
    return path.name[: -len(".nii.gz")]


def _noise(shape, seed: int) -> np.ndarray:
    """±8 HU of noise: a random 61 × 67 × 5 block tiled over the volume (cheap for 87 M voxels)."""
    block = np.random.default_rng(seed).integers(-8, 9, size=(61, 67, 5), dtype=np.int16)
    reps = [-(-n // b) for n, b in zip(shape, block.shape)]
    return np.tile(block, reps)[: shape[0], : shape[1], : shape[2]]


def write_ct_like(img, label: np.ndarray, out: Path, seed: int) -> None:
    """A CT with the label file's exact header (shape, affine, qform/sform codes): HU by label + noise."""
    lut = np.zeros(7, dtype=np.int16)
    for value, hu in HU.items():
        lut[value] = hu
    ct = lut[label]
    ct += _noise(label.shape, seed)
    header = img.header.copy()
    header.set_data_dtype(np.int16)
    header.set_slope_inter(1.0, 0.0)
    nib.save(nib.Nifti1Image(ct, None, header=header), out)  # None: the header's own qform/sform


def hand_boxes(img, label: np.ndarray) -> dict:
    """``{"pancreas": (counts, boxes), "tumor": ..., "width", "height", "slices"}`` from world coordinates."""
    affine = img.affine
    axial = int(np.argmax(np.abs(affine[2, :3])))
    x_axis = int(np.argmax(np.abs(affine[0, :3])))
    y_axis = int(np.argmax(np.abs(affine[1, :3])))
    assert len({axial, x_axis, y_axis}) == 3
    shape = np.array(label.shape)
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in shape], indexing="ij")).reshape(3, -1)
    world_corners = affine[:3, :3] @ corners + affine[:3, 3:4]
    x_right, y_front = world_corners[0].max(), world_corners[1].max()
    sx, sy = abs(affine[0, x_axis]), abs(affine[1, y_axis])
    out = {"width": int(shape[x_axis]), "height": int(shape[y_axis]), "slices": int(shape[axial])}
    pancreas = (label == 1) | (label == 4) | (label == 5)
    for target, mask in (("pancreas", pancreas), ("tumor", label == 1)):
        idx = np.array(np.nonzero(mask))
        world = affine[:3, :3] @ idx + affine[:3, 3:4]
        col = np.rint((x_right - world[0]) / sx).astype(int)
        row = np.rint((y_front - world[1]) / sy).astype(int)
        k = idx[axial]
        n = out["slices"]
        counts = np.bincount(k, minlength=n)
        boxes = np.zeros((n, 4), dtype=int)
        lo_c, lo_r = np.full(n, 10**9), np.full(n, 10**9)
        hi_c, hi_r = np.full(n, -1), np.full(n, -1)
        np.minimum.at(lo_c, k, col)
        np.minimum.at(lo_r, k, row)
        np.maximum.at(hi_c, k, col)
        np.maximum.at(hi_r, k, row)
        present = counts > 0
        boxes[present] = np.stack([lo_c, lo_r, hi_c, hi_r], axis=1)[present]
        out[target] = (counts, boxes)
    return out


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("panorama_real")
    images = root / "images"
    images.mkdir()
    truth = {}
    for i, label_path in enumerate(LABEL_FILES):  # each label file read once here, once by the pipeline
        img = nib.load(label_path)
        label = np.rint(np.asanyarray(img.dataobj)).astype(np.int16)
        truth[_study(label_path)] = hand_boxes(img, label)
        write_ct_like(img, label, images / f"{_study(label_path)}_0000.nii", seed=i)
        del label
    out = root / "prepared"
    assert preprocessing_main(["panorama", "--images", str(images), "--labels", str(PANORAMA / "manual_labels"),
                               str(PANORAMA / "automatic_labels"), "--clinical", str(SHEET), "--out", str(out),
                               "--normalization", "window", "--workers", "2"]) == 0
    infos = json.loads((out / "annotations" / "PANORAMA_slices_info.json").read_text())
    by_study: dict = {}
    for rec in infos:
        by_study.setdefault(rec["volume_name"], {})[rec["slice_index"]] = rec
    return out, by_study, truth


@pytest.mark.parametrize("label_path", LABEL_FILES, ids=[f"{p.parent.name}/{_study(p)}" for p in LABEL_FILES])
def test_every_slice_box_matches_the_label_file(prepared, label_path):
    out, by_study, hand = prepared
    records = by_study[_study(label_path)]
    truth = hand[_study(label_path)]
    assert sorted(records) == list(range(truth["slices"]))
    for k, rec in records.items():
        assert (rec["width"], rec["height"], rec["slice_count"]) == (truth["width"], truth["height"], truth["slices"])
        for target in ("pancreas", "tumor"):
            counts, boxes = truth[target]
            assert rec[f"pixels_{target}"] == counts[k], (target, k)
            assert rec[f"bbox_{target}"] == boxes[k].tolist(), (target, k)
    assert any(rec["pixels_pancreas"] for rec in records.values())
    # the PNG shows the CT in the same frame: parenchyma (110 HU) is brighter than the background
    # (-20 HU) inside the pancreas box of the slice with most pancreas
    k = max(records, key=lambda i: records[i]["pixels_pancreas"])
    png = np.asarray(Image.open(out / records[k]["image"]))
    x1, y1, x2, y2 = records[k]["bbox_pancreas"]
    counts, _ = truth["pancreas"]
    gray = lambda hu: 255 * (hu - WINDOW[0]) / (WINDOW[1] - WINDOW[0])  # noqa: E731
    box = png[y1:y2 + 1, x1:x2 + 1].astype(float)
    assert box.max() >= gray(HU[4] - 8) - 1 and box.min() <= gray(HU[0] + 8) + 1


def test_manual_labels_are_manual_and_sheet_values_arrive(prepared):
    from preprocessing.clinical import read_sheet

    _, by_study, _ = prepared
    sheet = read_sheet(SHEET)
    manual = {_study(p) for p in (PANORAMA / "manual_labels").glob("*.nii.gz")}
    assert len(by_study) == 12
    for study, records in by_study.items():
        row = sheet[study]
        for rec in records.values():
            assert rec["dataset"] == "PANORAMA" and rec["volume_name"] == study
            assert rec["label_source"] == ("manual" if study in manual else "automatic")
            assert (rec["patient_id"], rec["patient_label"], rec["reference_standard"], rec["scanner"],
                    rec["patient_age"], rec["patient_sex"], rec["study_date"]) == (
                row.patient_id, row.patient_label, row.level, row.scanner, row.patient_age, row.patient_sex,
                row.study_date)
    # values as published in the sheet (independent of the reader above)
    first = next(iter(by_study["100417_00002"].values()))
    assert (first["patient_id"], first["patient_label"], first["reference_standard"], first["study_date"],
            first["patient_age"], first["patient_sex"], first["scanner"]) == (
        "100417", "non-PDAC", "histopathology", "2021-09-15", 66, "F", "TOSHIBA")
    msd = next(iter(by_study["101129_00001"].values()))
    assert (msd["patient_label"], msd["reference_standard"], msd["scanner"]) == ("PDAC", "MSD_dataset", None)


def test_split_by_patient_and_msd_nih_rows(prepared):
    out, by_study, hand = prepared
    split = json.loads((out / "annotations" / "split.json").read_text())
    where = {s: name for name in ("train", "val", "test") for s in split[name]}
    # the two studies of patient 100417 land in one split
    assert where["100417_00001"] == where["100417_00002"]
    assert split["study_patient"]["100417_00001"] == split["study_patient"]["100417_00002"] == "100417"
    # the sheet flags 100036 and 101129 as MSD and 100329 as NIH: no folder matched them by content,
    # so they are in no split (never in val/test, never in training of a model evaluated on MSD/NIH)
    assert set(split["excluded"]) == {"100036_00001", "101129_00001", "100329_00001"}
    assert not set(split["excluded"]) & set(where)
    assert set(where) | set(split["excluded"]) == set(by_study)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["excluded"] == split["excluded"]
    # where the label and the sheet disagree, from the hand computation
    lesion_voxels = {s: int(t["tumor"][0].sum()) for s, t in hand.items()}
    labels = {s: next(iter(r.values()))["patient_label"] for s, r in by_study.items()}
    assert manifest["clinical"]["pdac_without_lesion_voxels"] == sorted(
        s for s in labels if labels[s] == "PDAC" and lesion_voxels[s] == 0)
    assert manifest["clinical"]["non_pdac_with_lesion_voxels"] == {
        s: lesion_voxels[s] for s in sorted(labels) if labels[s] == "non-PDAC" and lesion_voxels[s] > 0}
    assert manifest["clinical"]["sheet_rows_without_files"]["count"] == 2238 - 12
