"""``tc-import --csv``: the dataset column by the datasets' known names, anything else refused
(issue 25, item 3): keys that can never meet the source folders' would blind the leakage check."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from minigpt4.provenance import split_keys
from preprocessing.__main__ import main


def _crops(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((9, 5 + i), 100, dtype=np.uint8)).save(folder / f"c{i}.png")


def _import(tmp_path: Path, rows: list[str], name: str = "tc") -> int:
    csv = tmp_path / f"{name}.csv"
    csv.write_text("image,dataset,volume,slice_index,answer\n" + "\n".join(rows) + "\n")
    return main(["tc-import", "--images", str(tmp_path / "crops"), "--csv", str(csv), "--out", str(tmp_path / name),
                 "--test-ratio", "1"])


def test_known_dataset_names_give_the_source_keys(tmp_path):
    _crops(tmp_path / "crops", 6)
    assert _import(tmp_path, ["c0.png,Task07_Pancreas,pancreas_002.nii.gz,40,yes",
                              "c1.png,msd task07,pancreas_004,41,yes",
                              "c2.png,Pancreas-CT,PANCREAS_0001.nii,12,no",
                              "c3.png,nih_pancreas,PANCREAS_0003,12,no",
                              "c4.png,,pancreas_009,3,yes",  # an empty cell: the name's pattern tells
                              "c5.png,Medical Segmentation Decathlon,case_7,3,no"]) == 0
    assert split_keys(tmp_path / "tc", "test") == {
        ("MSD", "pancreas_002"), ("MSD", "pancreas_004"), ("NIH", "PANCREAS_0001"), ("NIH", "PANCREAS_0003"),
        ("MSD", "pancreas_009"), ("MSD", "case_7")}
    split = json.loads((tmp_path / "tc" / "annotations" / "split.json").read_text())
    assert set(split["volume_datasets"].values()) == {"MSD", "NIH"}


@pytest.mark.parametrize("row, message", [
    ("c0.png,Pancreas-XYZ,pancreas_002,40,yes", "tc.csv:2: column 'dataset': 'Pancreas-XYZ' is not a known source "
                                                "dataset (MSD: MSD, Task07_Pancreas"),
    ("c0.png,ABD,case_1,40,yes", "tc.csv:2: column 'dataset': 'ABD' is not a known source dataset"),
    ("c0.png,,case_1,40,yes", "tc.csv:2: column 'dataset' is empty and column 'volume' 'case_1' follows no known "
                              "name pattern"),
    ("c0.png,Pancreas-CT,pancreas_002,40,yes", "tc.csv:2: column 'volume': 'pancreas_002' is an MSD volume name but "
                                               "column 'dataset' says 'Pancreas-CT' (NIH)"),
])
def test_anything_else_is_refused_naming_column_and_value(tmp_path, capsys, row, message):
    _crops(tmp_path / "crops", 1)
    assert _import(tmp_path, [row]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "tc").exists()


def test_a_folder_imported_before_the_check_is_read_by_known_names(tmp_path):
    """A TC folder whose split.json says Task07_Pancreas (imported before names were checked):
    the leakage check reads it as MSD, so it meets MSD's own keys."""
    _crops(tmp_path / "crops", 1)
    assert _import(tmp_path, ["c0.png,MSD,pancreas_002,40,yes"]) == 0
    path = tmp_path / "tc" / "annotations" / "split.json"
    split = json.loads(path.read_text())
    split["volume_datasets"] = {"pancreas_002": "Task07_Pancreas"}
    path.write_text(json.dumps(split))
    assert split_keys(tmp_path / "tc", "test") == {("MSD", "pancreas_002")}
