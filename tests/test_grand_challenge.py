"""scan.py reads .mha / .nrrd (SimpleITK) and serves PANORAMA's algorithm interface
(``--grand-challenge``): one CT in, ``pdac-likelihood.json`` (one float) and
``images/pdac-detection-map/detection_map.mha`` out, on tmp paths, read back with SimpleITK
and compared voxel for voxel with a hand computation from the scripted boxes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from minigpt4.boxes import grid_to_pixel_inclusive
from minigpt4.inference.pipeline import SingleModel
from minigpt4.inference.readers import load_volume
from preprocessing import synthetic
from preprocessing.synthetic_panorama import write_mha
from tests._phantoms import small_volume
from tests.test_scan import TUMOR_GRID, AlwaysBoxes, scan_config, stage_paths  # noqa: F401 (fixture)

SPACING = (0.8, 0.7, 2.5)


def _ct(folder: Path, suffix: str = ".mha") -> Path:
    hu, _ = small_volume(h=40, w=48, s=4, seed=5)
    stored, affine = synthetic.stored(hu, SPACING, "LPS")
    path = folder / f"case{suffix}"
    if suffix == ".mha":
        write_mha(path, stored.astype(np.int16), affine)
    else:
        import SimpleITK as sitk

        folder.mkdir(parents=True, exist_ok=True)
        write_mha(folder / "tmp.mha", stored.astype(np.int16), affine)
        sitk.WriteImage(sitk.ReadImage(str(folder / "tmp.mha")), str(path))
        (folder / "tmp.mha").unlink()
    return path


@pytest.mark.parametrize("suffix", [".mha", ".nrrd"])
def test_load_volume_reads_itk_files_as_nifti(tmp_path, suffix):
    import nibabel as nib

    hu, _ = small_volume(h=40, w=48, s=4, seed=5)
    stored, affine = synthetic.stored(hu, SPACING, "LPS")
    synthetic.write_nifti(tmp_path / "case.nii.gz", stored.astype(np.int16), affine)
    itk = load_volume(_ct(tmp_path / "itk", suffix))
    nifti = load_volume(tmp_path / "case.nii.gz")
    assert np.array_equal(itk.slices, nifti.slices)  # same pixels in the same display frame
    assert itk.geometry.shape == nib.load(tmp_path / "case.nii.gz").shape
    assert np.allclose(itk.geometry.affine, nifti.geometry.affine)


def test_grand_challenge_mode(tmp_path, stage_paths, monkeypatch):  # noqa: F811
    import SimpleITK as sitk

    import scan
    from minigpt4.commands import scan as scan_command

    torch.set_num_threads(1)
    monkeypatch.setattr(scan_command, "load_stages", lambda *args, **kwargs: SingleModel(AlwaysBoxes()))
    inputs = tmp_path / "input" / "images" / "venous-ct"
    ct = _ct(inputs)
    out = tmp_path / "output"
    (out).mkdir()
    (out / "platform-file.txt").write_text("the platform's\n")
    config = scan_config(tmp_path, stage_paths)
    (result,) = scan.main(["--cfg-path", str(config), "--grand-challenge", "--inputs", str(inputs), "--out", str(out)])
    likelihood = json.loads((out / "pdac-likelihood.json").read_text())
    assert isinstance(likelihood, float) and likelihood == pytest.approx(0.75)  # every slice P(tumor) 0.75, max
    assert result["likelihood"] == likelihood and result["decision"] == "tumor"
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "images/pdac-detection-map/detection_map.mha", "pdac-likelihood.json", "platform-file.txt"]
    dmap = sitk.ReadImage(str(out / "images" / "pdac-detection-map" / "detection_map.mha"))
    source = sitk.ReadImage(str(ct))
    assert dmap.GetSize() == source.GetSize()
    assert np.allclose(dmap.GetOrigin(), source.GetOrigin()) and np.allclose(dmap.GetSpacing(), source.GetSpacing())
    assert np.allclose(dmap.GetDirection(), source.GetDirection())
    # the tumor box on all 4 slices: one lesion of likelihood 0.75 on those voxels
    geometry = load_volume(ct).geometry
    h, w, z = geometry.display_shape
    expected = np.zeros(geometry.shape, dtype=np.float32)
    for k in range(z):
        lo, hi = geometry.voxel_box(grid_to_pixel_inclusive(TUMOR_GRID, w, h), k)
        expected[lo[0]:hi[0] + 1, lo[1]:hi[1] + 1, lo[2]:hi[2] + 1] = 0.75
    assert np.array_equal(sitk.GetArrayFromImage(dmap).transpose(2, 1, 0), expected)
    assert len(result["candidates"]) == 1 and result["candidates"][0]["slices"] == [0, z - 1]


def test_grand_challenge_needs_one_ct(tmp_path, stage_paths, capsys):  # noqa: F811
    import scan
    from minigpt4.cli import run_main

    inputs = tmp_path / "venous-ct"
    _ct(inputs)
    write_mha(inputs / "second.mha", np.zeros((4, 4, 4), np.int16), np.eye(4))
    config = scan_config(tmp_path, stage_paths)
    status = run_main(scan.main, ["--cfg-path", str(config), "--grand-challenge", "--inputs", str(inputs),
                                  "--out", str(tmp_path / "o")], prog="scan.py")
    assert status == 2 and "expected one CT in the input, found 2 (case.mha, second.mha)" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
