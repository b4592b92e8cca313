"""``python -m preprocessing panorama`` on PANORAMA-format phantoms: records, split by patient,
the CSV sheet, .mha images, re-runs, and one clear line for every kind of bad input."""

from __future__ import annotations

import gzip
import json
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import openpyxl
import pytest

from preprocessing import synthetic_panorama
from preprocessing.__main__ import main as preprocessing_main
from preprocessing.slices import record_keys


@pytest.fixture(scope="module")
def raw_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("panorama_phantoms")
    synthetic_panorama.generate(out, n_patients=4, n_slices=8, size=40, log=lambda *_: None)
    return out


@pytest.fixture
def raw(raw_set, tmp_path):
    folder = tmp_path / "raw"
    shutil.copytree(raw_set, folder)
    return folder


def run(raw: Path, out: Path, *extra: str, sheet: str = "clinical_information.xlsx") -> int:
    return preprocessing_main(["panorama", "--images", str(raw / "images"), "--labels", str(raw / "manual_labels"),
                               str(raw / "automatic_labels"), "--clinical", str(raw / sheet), "--out", str(out),
                               "--workers", "1", *extra])


def error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.strip().splitlines()
           if not re.match(r"^volumes: \d+/\d+ ", line)]  # the progress log (minigpt4.progress)
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert "Traceback" not in err[0]
    return err[0]


def read(out: Path, name: str):
    return json.loads((out / name).read_text())


def test_records_split_and_csv_sheet(raw, tmp_path):
    out = tmp_path / "prepared"
    assert run(raw, out, "--test-ratio", "0.5", "--val-ratio", "0") == 0
    split = read(out, "annotations/split.json")
    # 4 patients, 2 PDAC (900001 with 2 studies, 900002) and 2 non-PDAC (900003 with 2 studies,
    # 900004): stratified, one patient of each class in test, and a patient's studies together
    assert split["study_patient"] == {"900001_00001": "900001", "900001_00002": "900001", "900002_00001": "900002",
                                      "900003_00001": "900003", "900003_00002": "900003", "900004_00001": "900004"}
    where = {s: name for name in ("train", "val", "test") for s in split[name]}
    assert len(where) == 6 and where["900001_00001"] == where["900001_00002"]
    assert where["900003_00001"] == where["900003_00002"]
    test_patients = {split["study_patient"][s] for s in split["test"]}
    assert len(test_patients) == 2 and len(test_patients & {"900001", "900002"}) == 1
    assert split["split_by"] == "patient" and split["excluded"] == {}
    infos = read(out, "annotations/PANORAMA_slices_info.json")
    assert all(list(r) == record_keys("PANORAMA") for r in infos)  # the MSD keys + the sheet's + label_source
    assert record_keys("PANORAMA")[: len(record_keys("MSD"))] == record_keys("MSD")
    first = {r["volume_name"]: r for r in infos}
    assert first["900002_00001"]["label_source"] == "automatic" and first["900001_00002"]["label_source"] == "manual"
    assert first["900004_00001"]["patient_label"] == "non-PDAC" and first["900001_00001"]["patient_label"] == "PDAC"
    assert not any(r["pixels_tumor"] for r in infos if r["patient_label"] == "non-PDAC")
    assert any(r["pixels_tumor"] for r in infos if r["volume_name"] == "900002_00001")
    # tumor selections exist beside the pancreas ones, and read_prepared reads both tasks
    from preprocessing.layout import read_prepared

    assert read_prepared(out, "tumor_detection", "train") or read_prepared(out, "tumor_detection", "test")
    assert {r["dataset"] for r in read_prepared(out, "pancreas_detection", "train")} == {"PANORAMA"}
    # the CSV export gives the same folder content
    csv_out = tmp_path / "from_csv"
    assert run(raw, csv_out, "--test-ratio", "0.5", "--val-ratio", "0", sheet="clinical_information.csv") == 0
    assert read(csv_out, "annotations/PANORAMA_slices_info.json") == infos
    assert read(csv_out, "annotations/split.json") == split


def test_mha_images_give_the_same_records(tmp_path):
    pytest.importorskip("SimpleITK")
    nii, mha = tmp_path / "nii", tmp_path / "mha"
    synthetic_panorama.generate(nii, 2, 6, 32, log=lambda *_: None)
    synthetic_panorama.generate(mha, 2, 6, 32, image_format="mha", log=lambda *_: None)
    assert run(nii, tmp_path / "a") == 0 and run(mha, tmp_path / "b") == 0
    assert read(tmp_path / "a", "annotations/PANORAMA_slices_info.json") == \
        read(tmp_path / "b", "annotations/PANORAMA_slices_info.json")
    assert (tmp_path / "a" / "slices").is_dir()
    pngs = sorted(p.name for p in (tmp_path / "a" / "slices").iterdir())
    assert pngs == sorted(p.name for p in (tmp_path / "b" / "slices").iterdir())
    for name in pngs:
        assert (tmp_path / "a" / "slices" / name).read_bytes() == (tmp_path / "b" / "slices" / name).read_bytes()


def test_manual_label_preferred_and_notes(raw, tmp_path, capsys):
    # an automatic label beside the manual one of 900001_00001 (other content: all lesion removed)
    label = nib.load(raw / "manual_labels" / "900001_00001.nii.gz")
    data = np.asarray(label.dataobj).copy()
    data[data == 1] = 4
    nib.save(nib.Nifti1Image(data, label.affine, label.header), raw / "automatic_labels" / "900001_00001.nii.gz")
    # a patient whose studies lie in different label folders
    shutil.move(raw / "automatic_labels" / "900003_00002.nii.gz", raw / "manual_labels" / "900003_00002.nii.gz")
    out = tmp_path / "prepared"
    assert run(raw, out) == 0
    printed = capsys.readouterr().out
    assert "note: 1 study has a manual and an automatic label; the manual one is used (900001_00001)" in printed
    assert ("note: patient 900003: studies in different label folders (900003_00001 automatic_labels, "
            "900003_00002 manual_labels)") in printed
    infos = read(out, "annotations/PANORAMA_slices_info.json")
    assert any(r["pixels_tumor"] for r in infos if r["volume_name"] == "900001_00001")  # the manual label's lesion
    manifest = read(out, "manifest.json")
    assert manifest["clinical"]["manual_replaced_automatic"] == ["900001_00001"]
    assert manifest["clinical"]["mixed_label_sources"] == {"900003": {"900003_00001": "automatic",
                                                                      "900003_00002": "manual"}}
    split = read(out, "annotations/split.json")
    where = {s: name for name in ("train", "val", "test") for s in split[name]}
    assert where["900003_00001"] == where["900003_00002"]


def test_sheet_rows_without_files_are_a_note(raw, tmp_path, capsys):
    book = openpyxl.load_workbook(raw / "clinical_information.xlsx")
    book.active.append([900099, "900099_00001", None, "050Y", "F", "SYNTHETIC", "PDAC", "radiology"])
    book.save(raw / "clinical_information.xlsx")
    assert run(raw, tmp_path / "prepared") == 0
    assert ("note: 1 of the 7 studies of " in capsys.readouterr().out)
    manifest = read(tmp_path / "prepared", "manifest.json")
    assert manifest["clinical"]["sheet_rows_without_files"] == {"count": 1, "first": ["900099_00001"]}


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _label_values(path: Path, value: int) -> None:
    img = nib.load(path)
    data = np.asarray(img.dataobj).copy()
    data[0, 0, 0] = value
    nib.save(nib.Nifti1Image(data, img.affine, img.header), path)


def _shift(path: Path) -> None:
    img = nib.load(path)
    affine = img.affine.copy()
    affine[:3, 3] += 7.5
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), affine), path)


def _rename_column(path: Path) -> None:
    book = openpyxl.load_workbook(path)
    book.active["A1"] = "patient_id"
    book.save(path)


def _drop_sheet_row(path: Path) -> None:
    book = openpyxl.load_workbook(path)
    sheet = book.active
    row = next(r[0].row for r in sheet.iter_rows() if r[1].value == "900004_00001")
    sheet.delete_rows(row)
    book.save(path)


BAD_INPUTS = {
    # case: (change to the raw folder, words the one line must hold)
    "image without label": (lambda r: (r / "automatic_labels" / "900004_00001.nii.gz").unlink(),
                            ["images/900004_00001_0000.nii.gz: image without label (no 900004_00001.nii.gz in"]),
    "label without image": (lambda r: (r / "images" / "900002_00001_0000.nii.gz").unlink(),
                            ["automatic_labels/900002_00001.nii.gz: label without image"]),
    "geometry disagrees": (lambda r: _shift(r / "automatic_labels" / "900004_00001.nii.gz"),
                           ["automatic_labels/900004_00001.nii.gz: geometry does not match the image",
                            "900004_00001_0000.nii.gz"]),
    "study missing from the sheet": (lambda r: _drop_sheet_row(r / "clinical_information.xlsx"),
                                     ["900004_00001_0000.nii.gz: study 900004_00001 is not in the clinical sheet"]),
    "unreadable label": (lambda r: _truncate(r / "automatic_labels" / "900004_00001.nii.gz"),
                         ["automatic_labels/900004_00001.nii.gz: corrupt or truncated NIfTI file"]),
    "label value outside 0-6": (lambda r: _label_values(r / "manual_labels" / "900001_00002.nii.gz", 9),
                                ["manual_labels/900001_00002.nii.gz: unexpected label values [9] "
                                 "(expected [0, 1, 2, 3, 4, 5, 6] for PANORAMA)"]),
    "renamed sheet column": (lambda r: _rename_column(r / "clinical_information.xlsx"),
                             ["clinical_information.xlsx: missing column(s) PANORAMA_patient_id (found: patient_id, "
                              "PANORAMA_study_id"]),
    "misnamed image": (lambda r: (r / "images" / "900004_00001_0000.nii.gz").rename(r / "images" / "scan_4.nii.gz"),
                       ["2 unpaired inputs", "scan_4.nii.gz: not named <patient>_<study>_0000.nii.gz",
                        "900004_00001.nii.gz: label without image"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_one_line_nothing_lost(raw, tmp_path, capsys, case):
    out = tmp_path / "prepared"
    assert run(raw, out) == 0  # an earlier, good preparation
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    change, words = BAD_INPUTS[case]
    change(raw)
    assert run(raw, out) == 2
    line = error_line(capsys)
    for w in words:
        assert w in line, line
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    manifest = Path("manifest.json")
    # nothing lost, nothing half-written; a failure found while reading the volumes leaves the
    # manifest "incomplete" (read_prepared refuses the folder until a re-run), still owning every file
    assert {k: v for k, v in after.items() if k != manifest} == {k: v for k, v in before.items() if k != manifest}
    if after[manifest] != before[manifest]:
        state = json.loads(after[manifest])
        assert state["status"] == "incomplete"
        assert {str(k) for k in before if k != manifest} <= set(state["files"])


@pytest.mark.parametrize("case", ["unreadable label", "geometry disagrees", "study missing from the sheet"])
def test_on_error_skip_goes_on_without_the_study(raw, tmp_path, case):
    BAD_INPUTS[case][0](raw)
    out = tmp_path / "prepared"
    assert run(raw, out, "--on-error", "skip") == 0
    manifest = read(out, "manifest.json")
    assert [s["volume"] for s in manifest["skipped"]] == ["900004_00001"]
    assert manifest["counts"]["volumes"] == 5
    assert "900004_00001" not in read(out, "annotations/split.json")["study_patient"]


def test_unreadable_gzip_label_as_in_the_release(raw, tmp_path, capsys):
    """automatic_labels/100433_00001 of the real release cannot be read (its content is missing):
    a gzip stream that ends early."""
    path = raw / "automatic_labels" / "900003_00001.nii.gz"
    path.write_bytes(gzip.compress(b"\x00" * 10)[:12])
    assert run(raw, tmp_path / "prepared") == 2
    assert "automatic_labels/900003_00001.nii.gz: corrupt or truncated NIfTI file" in error_line(capsys)


def test_sheet_problems_name_file_and_row(raw, tmp_path, capsys):
    book = openpyxl.load_workbook(raw / "clinical_information.xlsx")
    book.active["G3"] = "maybe"
    book.save(raw / "clinical_information.xlsx")
    assert run(raw, tmp_path / "prepared") == 2
    assert "clinical_information.xlsx: row 3: label 'maybe' of study 900001_00002 is not one of PDAC, non-PDAC" \
        in error_line(capsys)
    (raw / "sheet.ods").write_bytes(b"x")
    assert run(raw, tmp_path / "prepared", sheet="sheet.ods") == 2
    assert "sheet.ods: a clinical sheet must be .xlsx (as published) or .csv, not .ods" in error_line(capsys)
    (raw / "broken.xlsx").write_bytes(b"not a zip")
    assert run(raw, tmp_path / "prepared", sheet="broken.xlsx") == 2
    assert "broken.xlsx: cannot read the clinical sheet" in error_line(capsys)


def test_no_images_at_all(raw, tmp_path, capsys):
    for p in (raw / "images").iterdir():
        p.unlink()
    assert run(raw, tmp_path / "prepared") == 2
    assert "images: no PANORAMA images found (expected <patient>_<study>_0000.nii.gz or .mha files)" \
        in error_line(capsys)
    assert not (tmp_path / "prepared").exists()


def test_label_folder_of_unknown_kind(raw, tmp_path, capsys):
    (raw / "manual_labels").rename(raw / "labels_a")
    assert preprocessing_main(["panorama", "--images", str(raw / "images"), "--labels", str(raw / "labels_a"),
                               "--clinical", str(raw / "clinical_information.xlsx"), "--out", str(tmp_path / "o")]) == 2
    assert "--labels " in error_line(capsys)
    # manual=DIR says it
    assert preprocessing_main(["panorama", "--images", str(raw / "images"), "--labels", f"manual={raw / 'labels_a'}",
                               str(raw / "automatic_labels"), "--clinical", str(raw / "clinical_information.xlsx"),
                               "--out", str(tmp_path / "o"), "--workers", "1"]) == 0


def test_msd_scans_inside_panorama_keep_their_msd_identity(tmp_path, capsys):
    """PANORAMA re-distributes MSD / NIH scans. A study that ``--exclude-overlap-with`` finds by
    content goes to train under its MSD name (manifest ``overlap``), so the leakage guard stops a
    config that trains on PANORAMA and tests on that MSD volume; a study the sheet flags as MSD
    that no folder matches is in no split."""
    from minigpt4.config import load_config
    from minigpt4.provenance import LeakageError, check_training_config, split_keys
    from preprocessing import synthetic

    size, slices = 40, 8
    msd_raw = synthetic.generate(tmp_path / "raw_msd", "msd", 5, slices, size, "RAS", 0, log=lambda *_: None)
    msd = tmp_path / "MSD"
    assert preprocessing_main(["msd", "--images", msd_raw["images"], "--labels", msd_raw["labels"], "--out", str(msd),
                               "--workers", "1", "--test-ratio", "0.4", "--threshold", "0"]) == 0
    msd_test = read(msd, "annotations/split.json")["test"]
    copied = msd_test[0]  # an MSD test volume, about to appear inside PANORAMA
    raw = tmp_path / "raw_panorama"
    synthetic_panorama.generate(raw, n_patients=4, n_slices=slices, size=size, msd_flagged=2, log=lambda *_: None)
    # 900005 and 900006 are flagged MSD_dataset by the sheet; 900005_00001 really is MSD `copied`,
    # stored in PANORAMA's LPS orientation with PANORAMA's label values (1 lesion, 4 parenchyma)
    hu, label, spacing = synthetic.phantom(size, slices, seed=int(copied.split("_")[1]), scheme="msd")
    panorama_label = np.select([label == 2, label == 1], [1, 4], 0).astype(np.uint8)
    for array, path in ((hu, raw / "images" / "900005_00001_0000.nii.gz"),
                        (panorama_label, raw / "automatic_labels" / "900005_00001.nii.gz")):
        synthetic.write_nifti(path, *synthetic.stored(array, spacing, "LPS"))
    out = tmp_path / "PANORAMA"
    assert run(raw, out, "--exclude-overlap-with", str(msd), "--test-ratio", "0.5") == 0
    assert "PANORAMA: 1 study flagged MSD_dataset/NIH_dataset by the sheet and not matched by content" \
        in capsys.readouterr().out
    manifest = read(out, "manifest.json")
    assert {k: (v["dataset"], v["volume"]) for k, v in manifest["overlap"].items()} == {"900005_00001": ("MSD", copied)}
    split = read(out, "annotations/split.json")
    assert "900005_00001" in split["train"] and split["kept_in_train"] == ["900005_00001"]
    assert list(split["excluded"]) == ["900006_00001"]
    assert "900006_00001" not in split["train"] + split["val"] + split["test"]
    keys = split_keys(str(out), "train")
    assert ("MSD", copied) in keys and ("PANORAMA", "900005_00001") not in keys
    assert ("PANORAMA", "900001_00001") in keys | split_keys(str(out), "test")
    config = tmp_path / "config.yaml"
    config.write_text(f"datasets:\n  panorama: {{root: {out}, task: pancreas_detection}}\n"
                      f"  msd: {{root: {msd}, task: pancreas_detection}}\n")
    with pytest.raises(LeakageError) as info:
        check_training_config(load_config(config))
    assert f"MSD {copied} is in datasets.msd test but trained on by datasets.panorama of this config" in str(info.value)


def test_tc_from_panorama_and_the_histogram_baseline(raw_set, tmp_path):
    """``preprocessing tc --panorama``: yes = PDAC lesion slices, no = non-PDAC patients' pancreas
    slices (same scanner), each crop the pancreas box of its slice's PNG, the PANORAMA split kept;
    Table 2's crop-size + histogram baseline runs on these crops."""
    from PIL import Image

    from minigpt4.evaluation.baselines import histogram_baseline_metrics
    from minigpt4.provenance import split_keys
    from preprocessing.layout import read_prepared

    prepared = tmp_path / "PANORAMA"
    assert run(raw_set, prepared, "--test-ratio", "0.5", "--val-ratio", "0", "--all-slices") == 0
    out = tmp_path / "TC_PANORAMA"
    assert preprocessing_main(["tc", "--panorama", str(prepared), "--out", str(out), "--workers", "1"]) == 0
    infos = {(r["volume_name"], r["slice_index"]): r for r in read(prepared, "annotations/PANORAMA_slices_info.json")}
    pan_split = read(prepared, "annotations/split.json")
    tc_split = read(out, "annotations/split.json")
    for s in ("train", "test"):
        assert set(tc_split[s]) == set(pan_split[s])  # every crop keeps its study's split
        records = read(out, f"annotations/TC_{s}.json")
        yes = [r for r in records if r["answer"] == "yes"]
        assert len(yes) == len(records) - len(yes) > 0  # balanced, both classes
        for r in records:
            source = infos[(r["volume_name"], r["slice_index"])]
            assert r["dataset"] == "PANORAMA" and r["volume_name"] in pan_split[s]
            if r["answer"] == "yes":
                assert source["patient_label"] == "PDAC" and source["pixels_tumor"] > 0
            else:
                assert source["patient_label"] == "non-PDAC" and source["pixels_pancreas"] > 0
            x1, y1, x2, y2 = source["bbox_pancreas"]
            expected = np.asarray(Image.open(prepared / source["image"]))[y1:y2 + 1, x1:x2 + 1]
            np.testing.assert_array_equal(np.asarray(Image.open(out / r["image"])), expected)
    assert set(tc_split["volume_datasets"].values()) == {"PANORAMA"}
    assert split_keys(str(out), "test") == split_keys(str(prepared), "test")
    assert read(out, "manifest.json")["parameters"]["variant"] == "panorama"
    train = read_prepared(out, "tumor_classification", "train")
    test = read_prepared(out, "tumor_classification", "test")
    baseline = histogram_baseline_metrics(train, test, seed=0)
    assert baseline["n"] == len(test) and 0.0 <= baseline["accuracy"] <= 1.0
    # --panorama is alone: no --msd beside it
    assert preprocessing_main(["tc", "--panorama", str(prepared), "--msd", str(prepared), "--out",
                               str(tmp_path / "x")]) == 2


def test_preprocessing_benchmark_runs_on_panorama_volumes(tmp_path):
    """benchmarks/bench_preprocess.py --dataset panorama: the pipeline and the read + PNG floor on the
    same float64-label PANORAMA-format files (figures printed, not asserted)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_preprocess", Path(__file__).resolve().parents[1]
                                                  / "benchmarks" / "bench_preprocess.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--dataset", "panorama", "--n", "2", "--size", "48", "--slices", "8", "--repeat", "1",
                       "--workers", "1", "--data", str(tmp_path / "data"), "--json", str(tmp_path / "r.json")]) == 0
    result = read(tmp_path, "r.json")
    assert result["dataset"] == "panorama" and result["volumes"] == 2 and result["pngs"] > 0
    assert result["floor"]["wall_s"] > 0 and result["ratio_cpu"] > 0
    label = next((tmp_path / "data" / "automatic_labels").glob("*.nii.gz"))
    assert nib.load(label).get_data_dtype() == np.float64  # as the release stores most labels


def test_unreadable_mha_image_one_line(tmp_path, capfd):
    pytest.importorskip("SimpleITK")
    raw = tmp_path / "raw"
    synthetic_panorama.generate(raw, 2, 6, 32, image_format="mha", log=lambda *_: None)
    truncated = raw / "images" / "900002_00001_0000.mha"
    truncated.write_bytes(truncated.read_bytes()[:-3000])
    assert run(raw, tmp_path / "a") == 2
    assert ("images/900002_00001_0000.mha: corrupt or unreadable MetaImage file (M_ReadElementsData: data not read "
            "completely") in error_line(capfd)  # ITK's own words, not its stderr chatter
    (raw / "images" / "900002_00001_0000.mha").write_text("garbage\n")
    assert run(raw, tmp_path / "b") == 2
    assert "900002_00001_0000.mha: corrupt or unreadable MetaImage file (Unable to determine ImageIO reader)" \
        in error_line(capfd)


def test_split_by_patient_is_seeded_stratified_and_keeps_patients_whole():
    from preprocessing.clinical import Study
    from preprocessing.panorama import split_by_patient

    sheet = {}
    for i in range(40):  # 10 PDAC + 30 non-PDAC patients; patient 100047 has five studies (as in the release)
        patient = "100047" if i == 0 else f"2{i:05d}"
        for k in range(1, (5 if i == 0 else 1) + 1):
            study = f"{patient}_{k:05d}"
            sheet[study] = Study(study, patient, "PDAC" if i >= 30 else "non-PDAC", "radiology")
    sheet["300001_00001"] = Study("300001_00001", "300001", "PDAC", "MSD_dataset")  # flagged, unmatched
    sheet["300002_00001"] = Study("300002_00001", "300002", "non-PDAC", "NIH_dataset")  # flagged, matched
    overlap = {"300002_00001": {"dataset": "NIH", "volume": "PANCREAS_0007", "file": "x"}}
    split = split_by_patient(list(sheet), sheet, overlap, 0.2, 0.1, seed=3)
    assert split == split_by_patient(list(reversed(list(sheet))), sheet, overlap, 0.2, 0.1, seed=3)
    where = {s: name for name in ("train", "val", "test") for s in split[name]}
    assert {where[f"100047_{k:05d}"] for k in range(1, 6)} in ({"train"}, {"val"}, {"test"})
    patients_in = lambda name, label: {sheet[s].patient_id for s in split[name] if sheet[s].patient_label == label}  # noqa: E731
    # per stratum: round(0.2 n) patients in test, round(0.1 of the rest) in val (splits.split_volumes)
    assert len(patients_in("test", "PDAC")) == 2 and len(patients_in("test", "non-PDAC")) == 6
    assert len(patients_in("val", "PDAC")) == 1 and len(patients_in("val", "non-PDAC")) == 2
    assert split["excluded"].keys() == {"300001_00001"} and "300001_00001" not in where
    assert where["300002_00001"] == "train" and split["kept_in_train"] == ["300002_00001"]
    assert split["study_patient"]["100047_00003"] == "100047"
    assert split != split_by_patient(list(sheet), sheet, overlap, 0.2, 0.1, seed=4)


def test_label_and_sheet_disagreements_are_notes(raw, tmp_path, capsys):
    """The sheet is the patient truth: a PDAC study whose (automatic) label has no lesion voxel stays
    PDAC, a non-PDAC study with lesion voxels stays non-PDAC; both are said and recorded."""
    path = raw / "automatic_labels" / "900002_00001.nii.gz"  # PDAC, automatic label: remove its lesion
    img = nib.load(path)
    data = np.asarray(img.dataobj).copy()
    data[data == 1] = 4
    nib.save(nib.Nifti1Image(data, img.affine, img.header), path)
    path = raw / "automatic_labels" / "900004_00001.nii.gz"  # non-PDAC: 3 lesion voxels in the parenchyma
    img = nib.load(path)
    data = np.asarray(img.dataobj).copy()
    for i, j, k in np.argwhere(data == 4)[:3]:
        data[i, j, k] = 1
    nib.save(nib.Nifti1Image(data, img.affine, img.header), path)
    out = tmp_path / "prepared"
    assert run(raw, out) == 0
    printed = capsys.readouterr().out
    assert ("note: 1 PDAC study has no lesion (label 1) voxel (900002_00001); they stay PDAC: the sheet is the "
            "patient truth") in printed
    assert "note: 1 non-PDAC study has lesion (label 1) voxels (900004_00001: 3); they stay non-PDAC" in printed
    clinical_notes = read(out, "manifest.json")["clinical"]
    assert clinical_notes["pdac_without_lesion_voxels"] == ["900002_00001"]
    assert clinical_notes["non_pdac_with_lesion_voxels"] == {"900004_00001": 3}
    infos = read(out, "annotations/PANORAMA_slices_info.json")
    assert {r["patient_label"] for r in infos if r["volume_name"] == "900002_00001"} == {"PDAC"}


def test_table2_shows_the_baseline_per_folder_for_the_paper_set_and_panorama(raw_set, tmp_path):
    """eval_classification.py over the paper's kind of TC folder (MSD yes / NIH no) and a PANORAMA
    one: the model and the crop-size + histogram baseline per folder, with the variants named."""
    import eval_classification
    from PIL import Image

    from preprocessing.tc import import_tc

    prepared = tmp_path / "PANORAMA"
    assert run(raw_set, prepared, "--test-ratio", "0.5", "--val-ratio", "0") == 0
    assert preprocessing_main(["tc", "--panorama", str(prepared), "--out", str(tmp_path / "TC_PANORAMA"),
                               "--workers", "1"]) == 0
    crops = tmp_path / "crops"
    crops.mkdir()
    rng = np.random.default_rng(1)
    lines = ["image,dataset,volume,slice_index,answer"]
    for v in range(6):  # the paper's confound in miniature: MSD crops bright and yes, NIH dark and no
        name = f"c{v}.png"
        Image.fromarray(rng.integers(0, 100, (20, 24), dtype=np.uint8) + (120 if v % 2 else 0)).save(crops / name)
        lines.append(f"{name},{'MSD' if v % 2 else 'NIH'},{'pancreas_%03d' % v if v % 2 else 'PANCREAS_%04d' % v},1,"
                     f"{'yes' if v % 2 else 'no'}")
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    import_tc(crops, tmp_path / "TC", csv_path=str(tmp_path / "labels.csv"), test_ratio=0.5, val_ratio=0.0, seed=0)
    config = Path(__file__).resolve().parents[1] / "eval_configs" / "tc_cpu.yaml"
    m = eval_classification.main(["--cfg-path", str(config), "--options", f"datasets.tc.root={tmp_path / 'TC'}",
                                  f"datasets.tc_panorama.root={tmp_path / 'TC_PANORAMA'}",
                                  "datasets.tc_panorama.task=tumor_classification", "model.ckpt=null",
                                  f"run.output_dir={tmp_path / 'out'}", "--bootstrap", "0", "--no-figures"])
    assert m["tc_variant"] == {"tc": "paper", "tc_panorama": "panorama"}
    folder = m["per_folder"]["tc_panorama"]
    assert folder["n"] == len(read(tmp_path / "TC_PANORAMA", "annotations/TC_test.json"))
    assert 0.0 <= folder["baseline"]["accuracy"] <= 1.0
    text = (tmp_path / "out" / "tables.md").read_text()
    assert f"| tc_panorama | panorama | {folder['n']} | {folder['accuracy']:.3f} |" in text
    assert "TC folder variant `panorama`: `yes` = PANORAMA slices with PDAC lesion voxels" in text


def test_on_error_fail_stops_at_the_first_bad_study(raw, tmp_path, capsys, monkeypatch):
    """The full release has an unreadable label: the default --on-error fail names it without
    first preparing every study after it."""
    from preprocessing import pipeline

    seen = []
    real = pipeline.process_volume
    monkeypatch.setattr(pipeline, "process_volume", lambda job: seen.append(job.volume_name) or real(job))
    _truncate(raw / "manual_labels" / "900001_00002.nii.gz")  # the 2nd of 6 studies in name order
    assert run(raw, tmp_path / "prepared") == 2
    assert "manual_labels/900001_00002.nii.gz: corrupt or truncated NIfTI file" in error_line(capsys)
    assert seen == ["900001_00001", "900001_00002"]
    seen.clear()
    assert run(raw, tmp_path / "skipping", "--on-error", "skip") == 0
    assert len(seen) == 6
