"""Fitness checks (issue 28.3): each check made to fail by a volume built for it, read from a file
through the scan's reader; a check that cannot be computed is unknown, never a crash."""

from __future__ import annotations

import math

import numpy as np
import pydicom
import pytest

from minigpt4.inference.fitness import CHECKS, THRESHOLDS, check_fitness, fitness_summary, outside_validated_range
from minigpt4.inference.pipeline import SliceResult
from minigpt4.inference.readers import load_volume
from preprocessing import synthetic
from preprocessing.acquisition import envelope_from_records

from _phantoms import SHARED_DATA

# a training envelope as the trainer records it: two volumes, 1.0–2.5 mm slices, 0.7–0.9 mm pixels
ENVELOPE = envelope_from_records(
    {"MSD/a": {"slice_thickness_mm": 1.0, "in_plane_spacing_mm": [0.7, 0.7], "matrix": [512, 512]},
     "MSD/b": {"slice_thickness_mm": 2.5, "in_plane_spacing_mm": [0.9, 0.9], "matrix": [512, 512]}}, 2, ["MSD"])


def envelopes(env=ENVELOPE):
    return {stage: (env, "recorded") for stage in ("pancreas_detection", "tumor_classification", "tumor_detection")}


def phantom_nifti(path, spacing=(0.8, 0.8, 2.0), scale=1.0, affine_fn=None, n_slices=12):
    """The synthetic phantom (air −1000, fat −100, organs) as a NIfTI with ``spacing`` and HU × ``scale``."""
    hu, _, _ = synthetic.phantom(size=64, n_slices=n_slices, seed=3)
    arr, affine = synthetic.stored((hu * scale).astype(np.int16), spacing, "RAS")
    if affine_fn is not None:
        affine = affine_fn(affine)
    synthetic.write_nifti(path, arr, affine)
    return path


def phantom_dicom(folder, **tags):
    hu, _, _ = synthetic.phantom(size=64, n_slices=12, seed=3)
    synthetic.write_dicom_series(folder, hu, (0.8, 0.8, 2.0), "P1", 0)
    for file in sorted((folder / "study" / "series").iterdir()):
        ds = pydicom.dcmread(file)
        for key, value in tags.items():
            setattr(ds, key, value)
        ds.save_as(file)
    return folder / "study" / "series"


def boxed(indices, n=12):
    return [SliceResult(k, "{<10><10><20><20>}", (10, 10, 20, 20), (6.4, 6.4, 12.8, 12.8)) if k in indices
            else SliceResult(k, "no") for k in range(n)]


def run(volume, results=None, env=None):
    checks = check_fitness(volume.acquisition, volume.dicom_headers, results if results is not None else boxed({4, 5, 6}),
                           volume.num_slices, envelopes() if env is None else env)
    assert [c["check"] for c in checks] == list(CHECKS)
    return {c["check"]: c for c in checks}


def test_a_fit_volume_passes(tmp_path):
    checks = run(load_volume(phantom_nifti(tmp_path / "ok.nii.gz")))
    status = {name: c["status"] for name, c in checks.items()}
    # NIfTI records neither modality nor contrast: unknown, with the reason
    assert status == {"modality": "unknown", "slice_thickness": "passed", "pixel_spacing": "passed",
                      "orientation": "passed", "hu_sanity": "passed", "z_coverage": "passed", "contrast": "unknown"}
    assert "NIfTI" in checks["modality"]["reason"]
    assert checks["hu_sanity"]["values"]["air_peak_hu"] == pytest.approx(-1000, abs=20)
    assert checks["hu_sanity"]["values"]["fat_peak_hu"] == pytest.approx(-100, abs=20)
    assert checks["slice_thickness"]["values"]["value"] == 2.0
    assert checks["z_coverage"]["values"] == {"n_slices": 12, "first_pancreas_slice": 4, "last_pancreas_slice": 6,
                                              "n_pancreas_slices": 3}
    assert not outside_validated_range(list(checks.values()))
    assert fitness_summary(list(checks.values())) == "no check failed: 5 passed, 2 unknown (modality, contrast)"


def test_halved_hu_fails_the_hu_check(tmp_path):
    checks = run(load_volume(phantom_nifti(tmp_path / "half.nii.gz", scale=0.5)))
    hu = checks["hu_sanity"]
    assert hu["status"] == "failed" and hu["values"]["air_peak_hu"] == pytest.approx(-500, abs=20)
    assert "air peak is at" in hu["reason"] and "fat peak is at" in hu["reason"]
    assert outside_validated_range(list(checks.values()))
    assert fitness_summary(list(checks.values())) == "outside the validated range: hu_sanity failed"


def test_five_mm_slices_fail_against_the_envelope(tmp_path):
    checks = run(load_volume(phantom_nifti(tmp_path / "thick.nii.gz", spacing=(0.8, 0.8, 5.0))))
    thick = checks["slice_thickness"]
    assert thick["status"] == "failed" and thick["values"]["value"] == 5.0
    assert thick["values"]["training_range"]["pancreas_detection"] == [1.0, 2.5]
    assert "5 mm lies outside the training range of pancreas_detection [1, 2.5] mm" in thick["reason"]
    # 3.0 mm is inside 2.5 + 0.5 mm of tolerance
    assert run(load_volume(phantom_nifti(tmp_path / "t3.nii.gz", spacing=(0.8, 0.8, 3.0))))["slice_thickness"]["status"] == "passed"
    coarse = run(load_volume(phantom_nifti(tmp_path / "coarse.nii.gz", spacing=(1.5, 1.5, 2.0))))["pixel_spacing"]
    assert coarse["status"] == "failed" and coarse["values"]["value"] == 1.5


def test_tilted_affine_fails_orientation(tmp_path):
    angle = math.radians(10)
    tilt = np.eye(4)
    tilt[1:3, 1:3] = [[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]
    checks = run(load_volume(phantom_nifti(tmp_path / "tilted.nii.gz", affine_fn=lambda a: tilt @ a)))
    o = checks["orientation"]
    assert o["status"] == "failed" and o["values"]["obliquity_deg"] == pytest.approx(10, abs=0.01)
    assert "tilted 10.0°" in o["reason"]
    # a sagittal acquisition (the stored third axis runs left-right) is not axial
    sagittal = run(load_volume(phantom_nifti(tmp_path / "sag.nii.gz", affine_fn=lambda a: a[:, [2, 1, 0, 3]],
                                                n_slices=64)))
    assert sagittal["orientation"]["status"] == "failed" and "sagittal" in sagittal["orientation"]["reason"]


def test_pancreas_at_the_last_slice_fails_coverage(tmp_path):
    volume = load_volume(phantom_nifti(tmp_path / "cut.nii.gz"))
    cut = run(volume, boxed({9, 10, 11}))["z_coverage"]
    assert cut["status"] == "failed" and "last slice" in cut["reason"] and cut["values"]["last_pancreas_slice"] == 11
    assert run(volume, boxed({0, 1}))["z_coverage"]["reason"].startswith("pancreas boxes reach the first slice")
    none = run(volume, boxed(set()))["z_coverage"]
    assert none["status"] == "unknown" and "no slice got a pancreas box" in none["reason"]


def test_mr_dicom_and_non_contrast_tags_fail(tmp_path):
    mr = run(load_volume(phantom_dicom(tmp_path / "mr", Modality="MR")))
    assert mr["modality"]["status"] == "failed" and mr["modality"]["values"]["modality"] == "MR"
    assert mr["contrast"]["status"] == "unknown" and "no ContrastBolusAgent" in mr["contrast"]["reason"]
    ct = run(load_volume(phantom_dicom(tmp_path / "ct", ContrastBolusAgent="NONE")))
    assert ct["modality"]["status"] == "passed"
    assert ct["contrast"]["status"] == "failed" and "non-contrast" in ct["contrast"]["reason"]
    enhanced = run(load_volume(phantom_dicom(tmp_path / "iv", ContrastBolusAgent="Omnipaque 350", GantryDetectorTilt="15")))
    assert enhanced["contrast"]["status"] == "passed"
    assert enhanced["orientation"]["status"] == "failed" and "GantryDetectorTilt is 15°" in enhanced["orientation"]["reason"]


def test_without_an_envelope_or_a_measure_the_checks_say_unknown_and_never_raise(tmp_path):
    volume = load_volume(phantom_nifti(tmp_path / "ok.nii.gz"))
    foreign = {"pancreas_detection": (None, "none: checkpoint_stage3.pth is a foreign checkpoint")}
    checks = run(volume, env=foreign)
    assert checks["slice_thickness"]["status"] == "unknown"
    assert "foreign checkpoint" in checks["slice_thickness"]["reason"]
    blank = check_fitness(None, None, [], 12, {})
    assert [c["status"] for c in blank] == ["unknown"] * len(CHECKS)
    # garbage in: a header whose tilt is text, results that are not results → unknown with the reason
    broken = {c["check"]: c for c in check_fitness({"slice_plane": "axial", "obliquity_deg": 0.0}, [type("H", (), {"GantryDetectorTilt": "abc"})()],
                                                   [object()], 12, envelopes())}
    assert broken["orientation"]["status"] == "unknown" and "could not be computed (ValueError" in broken["orientation"]["reason"]
    assert not outside_validated_range(blank)


def test_thresholds_have_reasons():
    assert all(t.reason and len(t.reason) > 40 for t in THRESHOLDS.values())


@pytest.mark.skipif(not (SHARED_DATA / "ct" / "totalseg_dicom" / "dicom").is_dir(), reason="../shared/data absent")
def test_real_dicom_ct_passes_its_own_checks():
    volume = load_volume(SHARED_DATA / "ct" / "totalseg_dicom" / "dicom")
    acq = volume.acquisition
    # the series' own header says 3 mm although its slices lie 2 mm apart (data README)
    assert acq["slice_thickness_mm"] == 3.0 and acq["slice_spacing_mm"] == 2.0
    assert acq["manufacturer"] == "SIEMENS" and acq["modality"] == "CT" and acq["matrix"] == [512, 512]
    checks = run(volume, env={})
    assert {n: c["status"] for n, c in checks.items() if c["status"] != "unknown"} == {
        "modality": "passed", "orientation": "passed", "hu_sanity": "passed", "z_coverage": "passed", "contrast": "passed"}


def test_foreign_and_older_checkpoints_say_they_have_no_envelope(tmp_path):
    import torch
    from safetensors.torch import save_file

    from minigpt4.models.checkpoints import FORMAT, checkpoint_envelope

    torch.save({"llama_proj.weight": torch.zeros(2, 2)}, tmp_path / "checkpoint_stage3.pth")
    assert checkpoint_envelope(tmp_path / "checkpoint_stage3.pth") == (
        None, "none: checkpoint_stage3.pth is a foreign checkpoint (its training data are not recorded)")
    save_file({"llama_proj.weight": torch.zeros(2, 2)}, tmp_path / "old.safetensors", metadata={"format": FORMAT})
    envelope, note = checkpoint_envelope(tmp_path / "old.safetensors")
    assert envelope is None and note.startswith("none: old.safetensors records no envelope")


def test_scaling_is_applied_to_the_sample_as_to_the_volume():
    """measure_acquisition(stored, slope, inter) equals measuring the scaled volume (no full copy)."""
    from preprocessing.acquisition import measure_acquisition

    hu, _, _ = synthetic.phantom(size=64, n_slices=12, seed=3)
    stored = ((hu.astype(np.int32) + 1024) // 2).astype(np.int16)  # slope 2, intercept −1024
    affine = np.diag([0.8, 0.8, 2.0, 1.0])
    direct = measure_acquisition(stored.astype(np.float32) * 2 - 1024, affine, 2)
    assert measure_acquisition(stored, affine, 2, slope=2.0, inter=-1024.0) == direct
    assert direct["air_peak_hu"] == pytest.approx(-1000, abs=20) and direct["slice_thickness_mm"] == 2.0
    assert direct["matrix"] == [64, 64] and direct["n_slices"] == 12 and direct["in_plane_spacing_mm"] == [0.8, 0.8]


def test_envelope_of_a_run_over_msd_nih_and_the_tc_crops_made_from_them(tmp_path):
    """The trainer's envelope: the train volumes of every configured folder; a TC folder's crops
    take the acquisition records of the MSD / NIH folders they were cut from."""
    from types import SimpleNamespace

    from minigpt4.io import read_json
    from minigpt4.training.envelope import training_envelope
    from preprocessing import pipeline
    from preprocessing.tc import build_tc

    roots = {}
    for scheme, n, size in (("msd", 5, 64), ("nih", 4, 96)):
        raw = synthetic.generate(tmp_path / "raw" / scheme, scheme, n, 8, size, "RAS", 0, "nifti", log=lambda *a: None)
        roots[scheme] = tmp_path / scheme.upper()
        pipeline.prepare(pipeline.Options(dataset=scheme.upper(), images=[raw["images"]], labels=raw["labels"],
                                          out=str(roots[scheme]), workers=1), log=lambda *a: None)
    build_tc(roots["msd"], roots["nih"], tmp_path / "TC", margin=2)
    cfg = lambda *folders: SimpleNamespace(datasets={f.name: SimpleNamespace(root=str(f)) for f in folders})  # noqa: E731
    train = {ds: read_json(roots[ds] / "annotations" / "split.json")["train"] for ds in roots}
    spacing = {ds: read_json(roots[ds] / "annotations" / f"{ds.upper()}_acquisition.json") for ds in roots}
    env = training_envelope(cfg(roots["msd"], roots["nih"]))
    assert env["n_volumes"] == env["n_recorded"] == len(train["msd"]) + len(train["nih"])
    assert env["sources"] == ["MSD", "NIH"]
    # the phantoms' pixel spacing is 400 mm / size: 6.25 mm (64 px) and 4.1667 mm (96 px)
    assert env["in_plane_spacing_mm"]["min"] == pytest.approx(400 / 96, abs=1e-3)
    assert env["in_plane_spacing_mm"]["max"] == pytest.approx(400 / 64, abs=1e-3)
    assert env["matrix_rows"] == {"min": 64.0, "max": 96.0, "median": env["matrix_rows"]["median"]}
    assert set(spacing["msd"]) >= set(train["msd"])
    tc = training_envelope(cfg(tmp_path / "TC"))
    tc_train = read_json(tmp_path / "TC" / "annotations" / "split.json")["train"]
    assert tc["n_volumes"] == tc["n_recorded"] == len(tc_train) > 0 and tc["sources"] == ["TC"]
