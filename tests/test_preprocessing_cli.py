"""End to end on phantoms: synthetic → msd/nih/abd → read_prepared, tc, tc-import, report, reruns."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from preprocessing import layout, synthetic
from preprocessing.__main__ import main
from preprocessing.layout import read_prepared

ROOT = Path(__file__).resolve().parents[1]
DETECTION_KEYS = {"image", "q_id", "target", "bbox", "width", "height", "dataset", "volume_name", "slice_index"}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    base = tmp_path_factory.mktemp("prep")
    out = {}
    for scheme, sub in (("msd", ("imagesTr", "labelsTr")), ("nih", ("images", "labels"))):
        syn = base / f"syn_{scheme}"
        assert main(["synthetic", "--out", str(syn), "--scheme", scheme, "--n", "6", "--size", "64",
                     "--slices", "16", "--seed", "1"]) == 0
        out[scheme] = base / scheme
        assert main([scheme, "--images", str(syn / sub[0]), "--labels", str(syn / sub[1]), "--out", str(out[scheme]),
                     "--workers", "1", "--threshold", "0.3", "--test-ratio", "0.34", "--val-ratio", "0.25"]) == 0
        out[f"syn_{scheme}"] = syn
    return out


def _json(path):
    return json.loads(Path(path).read_text())


def test_layout_and_manifest(prepared):
    root = prepared["msd"]
    ann = root / "annotations"
    expected = {"MSD_slices_info.json", "split.json", "MSD_acquisition.json"} \
        | {f"MSD_{s}.json" for s in ("train", "val", "test")} \
        | {f"MSD_tumor_{s}.json" for s in ("train", "val", "test")}
    assert {p.name for p in ann.iterdir()} == expected
    manifest = _json(root / "manifest.json")
    assert manifest["dataset"] == "MSD" and manifest["status"] == "complete"
    assert manifest["counts"]["volumes"] == 6 and manifest["counts"]["slices"] == 6 * 16
    assert manifest["skipped"] == [] and manifest["parameters"]["threshold"] == 0.3
    assert {"read_s", "write_s", "wall_s"} <= set(manifest["timings"])
    split = _json(ann / "split.json")
    assert split["seed"] == 42 and (len(split["train"]), len(split["val"]), len(split["test"])) == (3, 1, 2)
    infos = _json(ann / "MSD_slices_info.json")
    pngs = {f"slices/{p.name}" for p in (root / "slices").iterdir()}
    assert pngs == {r["image"] for r in infos if r["image"]}
    assert all((r["image"] is not None) == (r["pixels_pancreas"] > 0) for r in infos)
    assert layout.dataset_name(root) == "MSD"


def test_read_prepared_records(prepared):
    root = prepared["msd"]
    split = _json(root / "annotations" / "split.json")
    for s in ("train", "val", "test"):
        recs = read_prepared(root, "pancreas_detection", s)
        assert recs and DETECTION_KEYS <= set(recs[0])
        assert [r["q_id"] for r in recs] == list(range(len(recs)))
        assert {r["volume_name"] for r in recs} <= set(split[s])
        for r in recs:
            assert Path(r["image"]).is_absolute() and Path(r["image"]).is_file()
            assert r["target"] == "pancreas" and r["bbox"] == r["bbox_pancreas"] and r["pancreas_bbox_ratio"] > 0.3
            with Image.open(r["image"]) as im:
                assert im.size == (r["width"], r["height"]) and im.mode == "L"
        tumor = read_prepared(root, "tumor_detection", s)
        assert all(r["target"] == "tumor" and r["bbox"] == r["bbox_tumor"] and r["tumor_bbox_ratio"] > 0.3 for r in tumor)
        assert {r["volume_name"] for r in tumor} <= set(split[s])  # one split shared by both stages
    # the synthetic pancreas is brighter than its surroundings inside its box (visible)
    r = read_prepared(root, "pancreas_detection", "train")[0]
    png = np.asarray(Image.open(r["image"]), dtype=float)
    x1, y1, x2, y2 = r["bbox"]
    assert png[y1:y2 + 1, x1:x2 + 1].mean() > png.mean()


def test_threshold_reselection_uses_the_cli_selection(prepared):
    root = prepared["msd"]
    for s in ("train", "test"):
        assert read_prepared(root, "pancreas_detection", s, threshold=0.3) == read_prepared(root, "pancreas_detection", s)
    low = read_prepared(root, "pancreas_detection", "train", threshold=0.0)
    high = read_prepared(root, "pancreas_detection", "train", threshold=0.8)
    assert len(low) > len(read_prepared(root, "pancreas_detection", "train")) > len(high) > 0
    assert all(r["pancreas_bbox_ratio"] > 0.8 for r in high)


def test_read_prepared_errors(prepared, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing_folder"):
        read_prepared(tmp_path / "missing_folder", "pancreas_detection", "train")
    with pytest.raises(FileNotFoundError, match="manifest"):
        read_prepared(tmp_path, "pancreas_detection", "train")
    with pytest.raises(ValueError, match="holds NIH data"):
        read_prepared(prepared["nih"], "tumor_detection", "train")
    with pytest.raises(ValueError, match="holds MSD data"):
        read_prepared(prepared["msd"], "organ_detection", "train")
    with pytest.raises(ValueError, match="unknown split"):
        read_prepared(prepared["msd"], "pancreas_detection", "validation")
    with pytest.raises(ValueError, match="unknown task"):
        read_prepared(prepared["msd"], "segmentation", "train")
    broken = tmp_path / "broken"
    (broken / "annotations").mkdir(parents=True)
    (broken / "manifest.json").write_text(json.dumps({"dataset": "MSD", "status": "complete", "parameters": {}}))
    with pytest.raises(FileNotFoundError, match="MSD_train.json"):
        read_prepared(broken, "pancreas_detection", "train")
    (broken / "manifest.json").write_text(json.dumps({"dataset": "MSD", "status": "incomplete"}))
    with pytest.raises(ValueError, match="did not finish"):
        read_prepared(broken, "pancreas_detection", "train")


def test_rerun_refuse_overwrite_and_workers(prepared, tmp_path):
    syn = prepared["syn_msd"]
    args = ["msd", "--images", str(syn / "imagesTr"), "--labels", str(syn / "labelsTr"), "--threshold", "0.3",
            "--test-ratio", "0.34", "--val-ratio", "0.25"]
    out = tmp_path / "again"
    assert main(args + ["--out", str(out), "--workers", "2"]) == 0
    ref = prepared["msd"] / "annotations"
    for name in ("MSD_slices_info.json", "MSD_train.json", "MSD_tumor_test.json", "split.json"):
        assert (out / "annotations" / name).read_bytes() == (ref / name).read_bytes()  # 2 workers == 1 worker
    pngs = sorted(p.name for p in (out / "slices").iterdir())
    # an interrupted run: lost PNGs, a temporary leftover, an unfinished manifest → rerun = clean run
    for name in pngs[:3]:
        (out / "slices" / name).unlink()
    (out / "slices" / ".x.png.123.tmp").write_bytes(b"partial")
    m = _json(out / "manifest.json")
    (out / "manifest.json").write_text(json.dumps({"dataset": "MSD", "status": "incomplete", "parameters": m["parameters"]}))
    assert main(args + ["--out", str(out), "--workers", "1"]) == 0
    assert sorted(p.name for p in (out / "slices").iterdir()) == pngs
    assert all((out / "slices" / n).read_bytes() == (prepared["msd"] / "slices" / n).read_bytes() for n in pngs)
    # other parameters: refused, nothing touched
    before = (out / "annotations" / "MSD_train.json").read_bytes()
    assert main(args[:-6] + ["--threshold", "0.5", "--out", str(out)]) == 2
    assert (out / "annotations" / "MSD_train.json").read_bytes() == before
    # --overwrite: replaced; balanced adds negatives (empty boxes)
    assert main(args + ["--out", str(out), "--balanced", "--overwrite", "--workers", "1"]) == 0
    bal = _json(out / "annotations" / "MSD_balanced_train.json")
    assert any(r["bbox"] == [0, 0, 0, 0] for r in bal) and any(r["bbox"] != [0, 0, 0, 0] for r in bal)
    assert all((out / r["image"]).is_file() for r in bal)
    # back to unbalanced: stale negative PNGs are removed
    assert main(args + ["--out", str(out), "--overwrite", "--workers", "1"]) == 0
    assert sorted(p.name for p in (out / "slices").iterdir()) == pngs
    assert not list((out / "annotations").glob("*balanced*"))


def test_refusal_message_names_the_folder(prepared, tmp_path, capsys):
    syn = prepared["syn_msd"]
    out = tmp_path / "o"
    base = ["msd", "--images", str(syn / "imagesTr"), "--labels", str(syn / "labelsTr"), "--out", str(out), "--workers", "1"]
    assert main(base) == 0
    assert main(base + ["--normalization", "window"]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "different parameters" in err and "normalization" in err


def test_tc_paper_and_msd_only(prepared, tmp_path):
    out = tmp_path / "tc"
    assert main(["tc", "--msd", str(prepared["msd"]), "--nih", str(prepared["nih"]), "--out", str(out)]) == 0
    msd_split = _json(prepared["msd"] / "annotations" / "split.json")
    nih_split = _json(prepared["nih"] / "annotations" / "split.json")
    msd_info = {r["slice_id"]: r for r in _json(prepared["msd"] / "annotations" / "MSD_slices_info.json")}
    total = 0
    for s in ("train", "val", "test"):
        recs = read_prepared(out, "tumor_classification", s)
        total += len(recs)
        yes = [r for r in recs if r["answer"] == "yes"]
        no = [r for r in recs if r["answer"] == "no"]
        assert len(yes) == len(no)
        assert all(r["dataset"] == "MSD" for r in yes) and all(r["dataset"] == "NIH" for r in no)
        assert {r["volume_name"] for r in yes} <= set(msd_split[s])  # split inherited
        assert {r["volume_name"] for r in no} <= set(nih_split[s])
        for r in yes:
            src = msd_info[r["slice_id"]]
            x1, y1, x2, y2 = src["bbox_pancreas"]
            assert (r["width"], r["height"]) == (x2 - x1 + 1, y2 - y1 + 1)  # inclusive: no lost row/column
            assert src["pixels_tumor"] > 0 and "bbox" not in r
            crop = np.asarray(Image.open(r["image"]))
            full = np.asarray(Image.open(prepared["msd"] / src["image"]))
            assert np.array_equal(crop, full[y1:y2 + 1, x1:x2 + 1])
    assert total > 0
    only = tmp_path / "tc_msd_only"
    assert main(["tc", "--msd", str(prepared["msd"]), "--variant", "msd-only", "--margin", "2", "--out", str(only)]) == 0
    recs = read_prepared(only, "tumor_classification", "train")
    assert recs and {r["dataset"] for r in recs} == {"MSD"}
    assert sum(r["answer"] == "yes" for r in recs) == sum(r["answer"] == "no" for r in recs)
    r = recs[0]
    x1, y1, x2, y2 = msd_info[r["slice_id"]]["bbox_pancreas"]
    assert r["crop_box"] == [max(0, x1 - 2), max(0, y1 - 2), min(63, x2 + 2), min(63, y2 + 2)]
    assert main(["tc", "--msd", str(prepared["msd"]), "--out", str(tmp_path / "x")]) == 2  # paper needs --nih
    with pytest.raises(ValueError, match="threshold re-selection"):
        read_prepared(out, "tumor_classification", "train", threshold=0.5)


def _crop(path: Path, w: int, h: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w), 100, dtype=np.uint8)).save(path)


def test_tc_import_release_names_csv_and_ratios(tmp_path):
    crops = tmp_path / "crops"
    for v in range(1, 6):
        for k in (10, 11):
            _crop(crops / f"PANCREAS_{v:04d}_slice_{k}.png", 20 + v, 10)
            _crop(crops / f"pancreas_{v:03d}_slice_{k}.png", 30, 12 + v)
    out = tmp_path / "tc"
    assert main(["tc-import", "--images", str(crops), "--out", str(out), "--test-ratio", "0.2", "--val-ratio", "0"]) == 0
    recs = {s: read_prepared(out, "tumor_classification", s) for s in ("train", "val", "test")}
    assert len(recs["train"]) + len(recs["test"]) == 20 and recs["val"] == []
    vols = {s: {r["volume_name"] for r in recs[s]} for s in recs}
    assert len(vols["test"]) == 2 and not vols["train"] & vols["test"]  # by volume (10 volumes → 2 test)
    r = next(r for r in recs["train"] + recs["test"] if r["volume_name"] == "PANCREAS_0003")
    assert (r["dataset"], r["answer"], r["width"], r["height"]) == ("NIH", "no", 23, 10)
    r = next(r for r in recs["train"] + recs["test"] if r["volume_name"] == "pancreas_002")
    assert (r["dataset"], r["answer"], r["height"]) == ("MSD", "yes", 14)
    all_test = tmp_path / "tc_test"
    assert main(["tc-import", "--images", str(crops), "--out", str(all_test), "--test-ratio", "1"]) == 0
    assert len(read_prepared(all_test, "tumor_classification", "test")) == 20
    assert read_prepared(all_test, "tumor_classification", "train") == []
    all_train = tmp_path / "tc_train"
    assert main(["tc-import", "--images", str(crops), "--out", str(all_train), "--test-ratio", "0", "--val-ratio", "0"]) == 0
    assert len(read_prepared(all_train, "tumor_classification", "train")) == 20
    # CSV: arbitrary names
    other = tmp_path / "other"
    _crop(other / "a.png", 5, 6)
    _crop(other / "b.png", 7, 8)
    csv = tmp_path / "labels.csv"
    csv.write_text("image,dataset,volume,slice_index,answer\na.png,MSD,v1,3,yes\nb.png,NIH,v2,4,no\n")
    out_csv = tmp_path / "tc_csv"
    assert main(["tc-import", "--images", str(other), "--csv", str(csv), "--out", str(out_csv), "--test-ratio", "0.5", "--val-ratio", "0"]) == 0
    got = read_prepared(out_csv, "tumor_classification", "train") + read_prepared(out_csv, "tumor_classification", "test")
    assert sorted((r["volume_name"], r["answer"], r["slice_index"], r["width"]) for r in got) == [("v1", "yes", 3, 5), ("v2", "no", 4, 7)]
    # bad names / bad CSV are errors naming the file
    from preprocessing.tc import import_tc

    _crop(crops / "PANCREAS_0009.png", 5, 5)
    with pytest.raises(ValueError, match="PANCREAS_0009.png: name is neither"):
        import_tc(crops, tmp_path / "bad")
    csv.write_text("image,dataset,volume,slice_index,answer\na.png,MSD,v1,3,maybe\n")
    with pytest.raises(ValueError, match="labels.csv:2"):
        import_tc(other, tmp_path / "bad2", csv_path=str(csv))


def test_tc_import_csv_keys_meet_the_source_volumes(tmp_path):
    """The paper's JSON naming (``dataset=MSD, volume=pancreas_002.nii.gz``): the key is the record's
    dataset and the volume stem, so it meets MSD's own ``('MSD', 'pancreas_002')``."""
    from minigpt4.provenance import split_keys
    from preprocessing.tc import import_tc

    other = tmp_path / "crops"
    for name, w in (("a.png", 5), ("b.png", 6), ("c.png", 7), ("d.png", 8)):
        _crop(other / name, w, 9)
    csv = tmp_path / "paper.csv"
    csv.write_text("image,dataset,volume,slice_index,answer\n"
                   "a.png,MSD,pancreas_002.nii.gz,40,yes\nb.png,MSD,pancreas_002.nii.gz,41,yes\n"
                   "c.png,NIH,PANCREAS_0001.nii,12,no\nd.png,msd,case_7.nii.gz,3,no\n")
    out = tmp_path / "tc"
    assert main(["tc-import", "--images", str(other), "--csv", str(csv), "--out", str(out), "--test-ratio", "1"]) == 0
    expected = {("MSD", "pancreas_002"), ("NIH", "PANCREAS_0001"), ("MSD", "case_7")}
    assert split_keys(out, "test") == expected
    records = read_prepared(out, "tumor_classification", "test")
    assert sorted({(r["dataset"], r["volume_name"]) for r in records}) == sorted(expected)
    split = json.loads((out / "annotations" / "split.json").read_text())
    assert split["test"] == ["PANCREAS_0001", "case_7", "pancreas_002"]
    assert split["volume_datasets"] == {"PANCREAS_0001": "NIH", "case_7": "MSD", "pancreas_002": "MSD"}
    # a folder written before volume_datasets (names as given): the records' dataset column decides
    del split["volume_datasets"]
    split["test"] = ["PANCREAS_0001.nii", "case_7.nii.gz", "pancreas_002.nii.gz"]
    (out / "annotations" / "split.json").write_text(json.dumps(split))
    assert split_keys(out, "test") == expected
    # one volume name under two datasets cannot be split by name
    csv.write_text("image,dataset,volume,slice_index,answer\na.png,MSD,v1.nii.gz,3,yes\nb.png,NIH,v1,4,no\n")
    with pytest.raises(ValueError, match="volume 'v1' is listed under two datasets"):
        import_tc(other, tmp_path / "bad", csv_path=str(csv))


def test_abd_and_report(prepared, tmp_path, capsys):
    syn = tmp_path / "syn_abd"
    assert main(["synthetic", "--out", str(syn), "--scheme", "abd", "--n", "3", "--size", "64", "--slices", "16"]) == 0
    out = tmp_path / "abd"
    assert main(["abd", "--images", str(syn / "images"), "--labels", str(syn / "masks"), "--out", str(out),
                 "--workers", "1", "--test-ratio", "0.34", "--val-ratio", "0"]) == 0
    recs = read_prepared(out, "organ_detection", "train")
    counts = {o: sum(r["target"] == o for r in recs) for o in ("liver", "kidney", "spleen", "pancreas")}
    assert len(set(counts.values())) == 1 and counts["liver"] > 0
    assert all(r["bbox"] == r[f"bbox_{r['target']}"] for r in recs)
    pancreas = read_prepared(out, "organ_detection", "train", organs=["pancreas"])
    assert {r["target"] for r in pancreas} == {"pancreas"} and len(pancreas) >= counts["pancreas"]
    capsys.readouterr()
    assert main(["report", str(prepared["msd"]), str(prepared["nih"])]) == 0
    text = capsys.readouterr().out.splitlines()
    assert len(text) == 12 + 5 + 10 and text[2].startswith("| 0 % |") and text[11].startswith("| 90 % |")
    n0 = len(read_prepared(prepared["msd"], "pancreas_detection", "train", threshold=0.0))
    assert text[2].split("|")[2].strip() == f"{n0:,}"
    # beside the paper's appendix Table 1: ours (train + val), paper train, ours test, paper test
    assert text[15].startswith("| threshold | MSD (msd) train+val | paper MSD train | MSD (msd) test | paper MSD test |")
    val0 = len(read_prepared(prepared["msd"], "pancreas_detection", "val", threshold=0.0))
    test0 = len(read_prepared(prepared["msd"], "pancreas_detection", "test", threshold=0.0))
    assert text[17].split("|")[2:6] == [f" {n0 + val0:,} ", " 6,936 ", f" {test0:,} ", " 1,803 "]
    assert text[-1].split("|")[7:10] == [" 504 ", text[11].split("|")[7], " 135 "]  # NIH at 90 %


def test_module_runs_from_another_directory(prepared, tmp_path):
    res = subprocess.run([sys.executable, "-m", "preprocessing", "report", str(prepared["msd"])], cwd=tmp_path,
                         capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr
    assert "| 60 % |" in res.stdout


def test_tc_import_split_from_inherits_the_cascade_split(prepared, tmp_path):
    splits = {ds: _json(prepared[ds] / "annotations" / "split.json") for ds in ("msd", "nih")}
    where = {v: s for ds in splits for s in ("train", "val", "test") for v in splits[ds][s]}
    crops = tmp_path / "crops"
    for v in where:
        _crop(crops / f"{v}_slice_5.png", 8, 8)
    assert all(v.startswith(("pancreas_", "PANCREAS_")) for v in where)  # the release's crop names
    out = tmp_path / "tc"
    assert main(["tc-import", "--images", str(crops), "--out", str(out), "--split-from",
                 str(prepared["msd"]), str(prepared["nih"])]) == 0
    got = {r["volume_name"]: s for s in ("train", "val", "test") for r in read_prepared(out, "tumor_classification", s)}
    assert got == where  # every crop volume in the split it has in the detection stages
    doc = _json(out / "annotations" / "split.json")
    assert doc["inherited_from"] == {"MSD": str(prepared["msd"].resolve()), "NIH": str(prepared["nih"].resolve())}
    # a crop volume that the cascade never saw, or a dataset without a folder, is refused
    _crop(crops / "pancreas_999_slice_1.png", 8, 8)
    from preprocessing.tc import import_tc

    with pytest.raises(ValueError, match=r"1 MSD crop volume\(s\) are not in its split.json: \['pancreas_999'\]"):
        import_tc(crops, tmp_path / "bad", split_from=[str(prepared["msd"]), str(prepared["nih"])])
    (crops / "pancreas_999_slice_1.png").unlink()
    with pytest.raises(ValueError, match="no prepared NIH folder given for the NIH crops"):
        import_tc(crops, tmp_path / "bad2", split_from=[str(prepared["msd"])])


def test_abd_exclude_overlap_finds_the_same_scan_by_content(prepared, tmp_path):
    import nibabel as nib

    syn = tmp_path / "syn_abd"
    assert main(["synthetic", "--out", str(syn), "--scheme", "abd", "--n", "4", "--size", "48", "--slices", "12"]) == 0
    # MSD's copy of ABD case 2: another name, stored flipped left-right (the affine says so)
    case = nib.load(str(syn / "images" / "Case_00002_0000.nii.gz"))
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = case.shape[0] - 1
    other = tmp_path / "msd_raw"
    other.mkdir()
    nib.save(nib.Nifti1Image(np.asarray(case.dataobj)[::-1].copy(), case.affine @ flip), str(other / "pancreas_042.nii.gz"))
    out = tmp_path / "abd"
    assert main(["abd", "--images", str(syn / "images"), "--labels", str(syn / "masks"), "--out", str(out), "--workers", "1",
                 "--test-ratio", "0.5", "--val-ratio", "0.5", "--exclude-overlap-with", str(other)]) == 0
    manifest = _json(out / "manifest.json")
    assert manifest["overlap"] == {"Case_00002": {"dataset": "MSD", "volume": "pancreas_042", "file": str(other / "pancreas_042.nii.gz")}}
    assert manifest["parameters"]["exclude_overlap_with"] == [str(other.resolve())]
    split = _json(out / "annotations" / "split.json")
    assert "Case_00002" in split["train"] and split["kept_in_train"] == ["Case_00002"]
    assert "Case_00002" not in split["val"] + split["test"]
    # the other three are split as usual: 0.5 test (2 of 3 → round(1.5) = 2), half of the rest val
    assert sorted(split["train"] + split["val"] + split["test"]) == [f"Case_0000{i}" for i in range(1, 5)]
    assert (len(split["test"]), len(split["val"])) == (2, 1)


def test_prepared_folder_fingerprints_are_those_of_its_raw_volumes(prepared):
    from preprocessing.overlap import same_scan, volume_fingerprint
    from preprocessing.pipeline import folder_volumes

    dataset, found = folder_volumes(prepared["msd"])
    raw_dataset, raw = folder_volumes(prepared["syn_msd"] / "imagesTr")
    assert dataset == raw_dataset == "MSD" and [n for n, _, _ in found] == [n for n, _, _ in raw]
    prints = [volume_fingerprint(i, k) for _, i, k in found]
    raw_prints = [volume_fingerprint(i, k) for _, i, k in raw]
    # each volume is the same scan as its raw file and as no other volume (distinct scans)
    assert [[same_scan(a, b) for b in raw_prints] for a in prints] == np.eye(len(prints), dtype=bool).tolist()


@pytest.mark.parametrize("variant", synthetic.COPY_VARIANTS)
def test_overlap_finds_a_modified_copy_and_not_another_phantom(variant, tmp_path):
    """An ABD phantom, a copy of it under an MSD name (``variant``) and a different phantom of the same
    family in one raw folder: ``find_overlap`` pairs the ABD volume with the copy only."""
    from preprocessing.overlap import find_overlap, raw_folder_volumes

    hu, _, spacing = synthetic.phantom(size=64, n_slices=40, seed=3, scheme="abd")
    assert spacing == (6.25, 6.25, 6.25)
    arr, affine = synthetic.stored(hu, spacing, "RAS")
    synthetic.write_nifti(tmp_path / "abd" / "Case_00003_0000.nii.gz", arr, affine)
    other_hu, _, _ = synthetic.phantom(size=64, n_slices=40, seed=4, scheme="abd")
    synthetic.write_nifti(tmp_path / "msd" / "pancreas_001.nii.gz", *synthetic.stored(other_hu, spacing, "RAS"))
    copy, copy_affine = synthetic.modified_copy(variant, hu, spacing)
    synthetic.write_nifti(tmp_path / "msd" / "pancreas_007.nii.gz", copy, copy_affine)
    own = [("Case_00003", str(tmp_path / "abd" / "Case_00003_0000.nii.gz"), "nifti")]
    found = find_overlap(own, [raw_folder_volumes(tmp_path / "msd")])
    assert found == {"Case_00003": {"dataset": "MSD", "volume": "pancreas_007",
                                    "file": str(tmp_path / "msd" / "pancreas_007.nii.gz")}}


def test_overlap_never_matches_different_phantoms_of_one_family():
    """All pairs of 24 distinct ABD phantoms: no match (the README's false-match figure uses 90)."""
    import itertools

    from preprocessing.overlap import fingerprint_array, match_fraction, same_scan

    prints = []
    for seed in range(24):
        hu, _, spacing = synthetic.phantom(size=64, n_slices=40, seed=seed, scheme="abd")
        prints.append(fingerprint_array(*synthetic.stored(hu, spacing, "RAS")))
    pairs = list(itertools.combinations(prints, 2))
    assert not any(same_scan(a, b) for a, b in pairs)
    assert max(match_fraction(a, b) for a, b in pairs) < 0.5  # far below MATCH_FRACTION = 0.9
