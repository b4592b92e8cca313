"""The demo's messages: no private path and no traceback in any handler's output, whatever the
upload (issue 19 item 7); a scan that boxed no pancreas is "inconclusive", never "no tumor found",
and the scan states what it assessed and its operating point (issue 18 item 9); a startup error
from loading the stages is one ``error:`` line (demo.py).

Handlers are called directly (no server) with files placed where Gradio keeps uploads: inside
the demo's private workdir under the temp dir, ``<workdir>/gradio/<hash>/<name>``.
"""

from __future__ import annotations

import gzip
import logging
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from minigpt4.demo.app import DemoHandlers
from minigpt4.demo.service import DemoService, make_private_workdir
from minigpt4.inference.pipeline import CascadeSettings
from minigpt4.inference.readers import public_message
from tests.test_demo import PANCREAS_Q, ScriptedModel, gray_slice, import_demo_entry_point, save, write_nifti

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------
# no private path, no traceback


@pytest.fixture()
def demo_workdir(monkeypatch):
    """A private workdir as demo.py makes it (``/tmp/minigpt_pancreas_demo_XXXX``), Gradio's temp
    dir inside it, and the folder of one upload in it."""
    workdir = make_private_workdir()
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(workdir / "gradio"))
    uploads = workdir / "gradio" / "5d1c0a9e7b"
    uploads.mkdir(parents=True)
    yield workdir, uploads
    shutil.rmtree(workdir, ignore_errors=True)


def broken_files(folder: Path) -> dict[str, Path]:
    """The hostile uploads: name → path (all inside ``folder``)."""
    rng = np.random.default_rng(0)
    files = {}
    files["random bytes"] = folder / "notimage.png"
    files["random bytes"].write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    volume = np.tile(np.arange(64, dtype=np.int16)[:, None, None] * 20 - 600, (1, 64, 6))
    full = write_nifti(folder / "whole.nii.gz", volume)
    files["truncated nii.gz"] = folder / "cut.nii.gz"
    files["truncated nii.gz"].write_bytes(full.read_bytes()[: len(full.read_bytes()) // 2])
    full.unlink()
    uncompressed = gzip.decompress(write_nifti(folder / "w2.nii.gz", volume).read_bytes())
    (folder / "w2.nii.gz").unlink()
    files["truncated nii"] = folder / "cut.nii"
    files["truncated nii"].write_bytes(uncompressed[:2000])  # nibabel names the file in its error
    files["garbage zip"] = folder / "garbage.zip"
    files["garbage zip"].write_bytes(b"PK\x03\x04" + rng.integers(0, 256, 2048, dtype=np.uint8).tobytes())
    files["zip of garbage"] = folder / "series.zip"
    with zipfile.ZipFile(files["zip of garbage"], "w") as archive:
        for k in range(3):
            archive.writestr(f"study/IM{k}", rng.integers(0, 256, 1000, dtype=np.uint8).tobytes())
    files["traversal zip"] = folder / "evil.zip"
    with zipfile.ZipFile(files["traversal zip"], "w") as archive:
        archive.writestr("../../../../etc/evil.dcm", b"DICM" * 200)
        archive.writestr("/abs/other.dcm", b"not dicom")
    files["empty png"] = folder / "empty.png"
    files["empty png"].write_bytes(b"")
    files["empty nii.gz"] = folder / "empty.nii.gz"
    files["empty nii.gz"].write_bytes(b"")
    return files


def shown_texts(outputs) -> list[str]:
    """Every string a handler returned for the user (chat contents, answers, summaries, rows)."""
    if isinstance(outputs, str):
        return [outputs]
    if isinstance(outputs, dict):
        return [t for v in outputs.values() for t in shown_texts(v)]
    if isinstance(outputs, (list, tuple)):
        return [t for v in outputs for t in shown_texts(v)]
    return []


def assert_private_paths_hidden(texts: list[str], workdir: Path, label: str) -> None:
    for text in texts:
        for private in ("/tmp/", str(workdir), workdir.name, "gradio/5d1c0a9e7b", os.path.expanduser("~") + "/",
                        "Traceback", 'File "'):
            assert private not in text, (label, private, text)


def test_every_handler_hides_private_paths_from_broken_uploads(demo_workdir):
    workdir, uploads = demo_workdir
    model = ScriptedModel({PANCREAS_Q: "{<10><20><50><80>}"})
    h = DemoHandlers(DemoService(model), workdir)
    files = broken_files(uploads)
    for label, path in files.items():
        name = path.name
        state, viewer, _, history, _, _ = h.on_upload(str(path), "paper", [], None)
        assert viewer is None and state["slices"] is None, label
        assert history[-1]["content"].startswith(f"⚠️ {name}: "), (label, history[-1]["content"])
        outputs = {
            "on_upload": history,
            "on_slider": h.on_slider(3, state)[1:],
            "on_ask": h.on_ask(PANCREAS_Q, history, state),
            "on_scan": h.on_scan(history, state)[1:],
            "api_ask": h.api_ask(str(path), PANCREAS_Q),
            "api_classify": h.api_classify(str(path)),
            "api_scan": h.api_scan(str(path), "paper"),
        }
        for handler, output in outputs.items():
            assert handler == "on_slider" or shown_texts(output), (handler, label)  # the slider shows no text
            assert_private_paths_hidden(shown_texts(output), workdir, f"{handler}({label})")
        slice_file = name.endswith(".png")
        for handler in ("api_ask", "api_classify") if slice_file else ("api_scan",):
            text, *rest = outputs[handler]
            assert text.startswith(f"⚠️ {name}: ") and rest[0] in (None, []), (handler, label, text)
    # the case, word for word
    text, image = h.api_ask(str(files["random bytes"]), PANCREAS_Q)
    assert text == ("⚠️ notimage.png: cannot be read as an image (UnidentifiedImageError: cannot identify image file "
                    "'notimage.png').") and image is None
    assert h.api_scan(str(files["truncated nii"]), "paper")[0].startswith(
        "⚠️ cut.nii: corrupt or truncated NIfTI file (OSError: Expected 49152 bytes, got 1648 bytes from cut.nii")
    assert model.calls == []  # no broken file reached the model


def test_broken_uploads_through_a_live_server_show_no_temp_path(demo_workdir, tmp_path, monkeypatch):
    """The issue's report, through Gradio itself: the upload is copied into Gradio's temp dir
    (``<workdir>/gradio/<hash>/notimage.png``), and the answer names only the file."""
    import socket

    from gradio_client import Client, handle_file

    from minigpt4.demo.app import build_app, launch

    workdir, _ = demo_workdir
    files = broken_files(tmp_path)
    app = build_app(DemoService(ScriptedModel({})), workdir=workdir)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launch(app, port=port, block=False, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        text, image = client.predict(handle_file(str(files["random bytes"])), PANCREAS_Q, api_name="/ask")
        assert text == ("⚠️ notimage.png: cannot be read as an image (UnidentifiedImageError: cannot identify image "
                        "file 'notimage.png').") and image is None
        summary, rows, image = client.predict(handle_file(str(files["truncated nii"])), "paper", api_name="/scan_volume")
        assert summary.startswith("⚠️ cut.nii: corrupt or truncated NIfTI file (OSError: Expected ") and rows == []
        assert "/tmp/" not in summary and workdir.name not in summary
        assert list((workdir / "gradio").rglob("notimage.png"))  # the upload really was in the private folder
    finally:
        app.close()


def test_model_failures_show_a_generic_line_and_log_the_traceback(demo_workdir, caplog):
    workdir, uploads = demo_workdir
    model = ScriptedModel({})
    h = DemoHandlers(DemoService(model), workdir)
    path = save(uploads, "slice.png", gray_slice())

    def failing(*args, **kwargs):
        raise RuntimeError(f"cannot map {path} into {workdir / 'cache' / 'kv.bin'}\n"
                           '  File "/usr/lib/python3/site.py", line 1, in <module>')

    model.generate = failing
    expected = ("⚠️ The model could not process this request (RuntimeError: cannot map slice.png into kv.bin). "
                "The app is still running: try another image or question.")
    caplog.set_level(logging.ERROR, logger="minigpt4.demo.app")
    assert h.api_ask(str(path), PANCREAS_Q) == (expected, None)
    state, *_ = h.on_upload(str(path), "paper", [], None)
    history, viewer, kept = h.on_ask(PANCREAS_Q, [], state)
    assert history[-1]["content"] == expected and kept == PANCREAS_Q and viewer is not None
    volume = write_nifti(uploads / "vol.nii.gz", np.tile(np.arange(64, dtype=np.int16)[:, None, None] * 10, (1, 64, 4)))
    assert h.api_scan(str(volume), "window")[0] == expected
    records = [r for r in caplog.records if r.name == "minigpt4.demo.app"]
    assert len(records) == 3 and all(r.exc_info and r.exc_info[0] is RuntimeError for r in records)


def test_handler_bugs_never_reach_gradio(demo_workdir):
    """A failure outside a handler's own try (here, a corrupted session state) is caught by the
    guard around every handler: the handler's outputs with a message, not an exception."""
    workdir, _ = demo_workdir
    h = DemoHandlers(DemoService(ScriptedModel({})), workdir)
    broken = {"kind": "volume", "slices": np.zeros(4), "index": 0, "boxes": {}, "path": str(workdir / "x.nii")}
    state, viewer = h.on_slider(2, broken)  # _render gets a 0-d "slice"
    assert state is broken and viewer == {"__type__": "update"}
    history, viewer, kept = h.on_ask(PANCREAS_Q, [], broken)
    assert history[-1]["content"].startswith("⚠️ The model could not process this request (") and kept == PANCREAS_Q
    *_, history, _ = h.on_scan([], broken)
    assert history[-1]["content"].startswith("⚠️ The model could not process this request (")
    assert_private_paths_hidden(shown_texts(history), workdir, "on_scan")


def test_public_message_strips_each_private_folder(monkeypatch, tmp_path):
    workdir = Path("/tmp/minigpt_pancreas_demo_k3j2")
    monkeypatch.setenv("GRADIO_TEMP_DIR", "/srv/gradio-tmp")
    monkeypatch.setenv("HF_HOME", "/data/hf")
    home = os.path.expanduser("~")
    upload = workdir / "gradio" / "ab12" / "my scan.png"
    message = (f"cannot read '{upload}'; see {workdir}/dicom_x/000003.dcm, {workdir}, {workdir}/gradio: "
               f"/srv/gradio-tmp/77/b.png /data/hf/hub/model.bin {home}/.cache/x.pt /tmp /tmpfiles/keep")
    assert public_message(message, upload, [workdir, workdir / "gradio"]) == (
        "cannot read 'my scan.png'; see 000003.dcm, (private folder), (private folder): b.png model.bin x.pt "
        "(private folder) /tmpfiles/keep")
    # a zip member's name replaces its extracted file
    assert public_message(f"bad pixel data in {workdir}/dicom_x/000001.dcm.", workdir / "gradio" / "s.zip",
                          [workdir / "dicom_x", workdir], {"000001.dcm": "study/IM1"}) == "bad pixel data in s.zip:study/IM1."


# ------------------------------------------------------------------------------------------------
# the scan's verdict


class ScriptedStage:
    """A stage double whose answers depend on the slice: every slice is constant, value v.

    ``image_transform`` keeps the pixel values; ``generate`` answers ``box`` to every question on
    slices with v >= 100 ("a pancreas is seen") and ``{<0><0><0><0>}`` below; ``yes_probability``
    is v / 255 of the crop (a crop of a constant slice has the slice's value).
    """

    device = "cpu"

    def __init__(self, box: str = "{<25><25><75><75>}") -> None:
        self.box = box
        self.calls: list[tuple[str, int]] = []

    @staticmethod
    def image_transform(pixels) -> torch.Tensor:
        image = torch.as_tensor(np.asarray(pixels), dtype=torch.float32)[None, None]
        return torch.nn.functional.interpolate(image, size=(32, 32))[0]  # crops and slices batch together

    def encode_tower(self, images):
        return images

    def generate(self, images, instructions, max_new_tokens=None, tower_tokens=None):
        images = tower_tokens if images is None else images
        self.calls.append(("generate", len(instructions)))
        return [self.box if float(img.mean()) >= 100 else "{<0><0><0><0>}" for img in images]

    def yes_probability(self, images, questions):
        self.calls.append(("yes_probability", len(questions)))
        return images.mean(dim=(1, 2, 3)) / 255.0


class ScriptedStages:
    """Three stage doubles on "one base" (the interface of minigpt4.models.stages.StageModels)."""

    shares_tower = False

    def __init__(self) -> None:
        self.by_stage = {s: ScriptedStage() for s in ("pancreas_detection", "tumor_classification", "tumor_detection")}
        self.model = self.by_stage["pancreas_detection"]

    def use(self, stage: str) -> ScriptedStage:
        return self.by_stage[stage]


def constant_volume(values) -> np.ndarray:
    return np.stack([np.full((64, 64), v, np.uint8) for v in values])


def scan_through_handlers(service: DemoService, values, tmp_path: Path):
    """"Scan volume" on a volume of constant slices: (chat text, table, plot)."""
    state = {"kind": "volume", "slices": constant_volume(values), "index": 0, "boxes": {}, "name": "vol.nii.gz"}
    _, _, _, plot, table, history, _ = DemoHandlers(service, tmp_path).on_scan([], state)
    return history[-1]["content"], table, plot


def three_stage_service(**cascade) -> tuple[DemoService, ScriptedStages]:
    stages = ScriptedStages()
    return DemoService(stages.model, stages=stages, cascade=CascadeSettings(**cascade)), stages


def test_no_pancreas_box_anywhere_is_inconclusive_never_no_tumor(tmp_path):
    service, stages = three_stage_service(threshold=0.6)
    text, table, plot = scan_through_handlers(service, [10, 60, 90, 20, 40], tmp_path)
    assert text == (
        "Scanned 5 slices. Three stages: pancreas box (stage 1) → P(tumor) on its crop (stage 2) → tumor box "
        "(stage 3). No slice was classified, so none is most suspicious. Patient-level answer: **inconclusive: no "
        "pancreas found on any slice** — this is not a negative result: the model never looked at a pancreas, so the "
        "threshold 0.600 (aggregation `max`) was not applied. Assessed: 0 of 5 slices got a pancreas box, so no "
        "slice was classified and none was asked for a tumor box. Input checks: no check failed: 0 passed, 7 unknown "
        "(modality, slice_thickness, pixel_spacing, orientation, hu_sanity, z_coverage, contrast).")
    assert "no tumor" not in text.lower()
    assert [row[1:3] for row in table] == [["", "no pancreas box"]] * 5
    assert stages.by_stage["tumor_classification"].calls == [] and stages.by_stage["tumor_detection"].calls == []
    assert not any("most suspicious" in line.get_label() for line in plot.axes[0].lines)


def test_boxes_with_low_p_tumor_are_no_tumor_found_with_what_was_assessed(tmp_path):
    # slices 1 and 3 get a pancreas box; their crops' P(tumor) = 120/255 = 0.471 and 140/255 = 0.549
    text, table, _ = scan_through_handlers(three_stage_service(threshold=0.6)[0], [10, 120, 60, 140, 20], tmp_path)
    assert text == (
        "Scanned 5 slices. Three stages: pancreas box (stage 1) → P(tumor) on its crop (stage 2) → tumor box "
        "(stage 3). Most suspicious: **slice 3**, P(tumor) = 0.549 (classified on the pancreas crop). Boxes: tumor "
        "in red, pancreas in cyan. The viewer now shows that slice. Patient-level answer: **no tumor found** "
        "(largest slice P(tumor) = 0.549, below the threshold 0.600; aggregation `max`); uncalibrated score 0.549 (not "
        "a probability: no calibration map was given). Assessed: 2 of 5 slices "
        "got a pancreas box; P(tumor) computed on 2 (2 on the pancreas crop); tumor box asked on 0 slices, found on 0. "
        "Input checks: no check failed: 1 passed, 6 unknown (modality, slice_thickness, pixel_spacing, orientation, "
        "hu_sanity, contrast).")
    assert [row[1] for row in table] == ["", 0.471, "", 0.549, ""]
    # lower the operating point: the same slices make a suspected tumor, stage 3 asked on both
    # with a calibration map (issue 28.1) the likelihood stands beside the raw score, naming the val set
    from minigpt4.inference.calibration import CalibrationMap

    service, _ = three_stage_service(threshold=0.4, aggregation="top_k_mean", top_k=2)
    service.calibration = CalibrationMap("isotonic", {"x": [0.0, 1.0], "y": [0.0, 0.5]},
                                         {"split": "val", "n_volumes": 40, "dataset": "MSD, NIH"})
    text, _, _ = scan_through_handlers(service, [10, 120, 60, 140, 20], tmp_path)
    assert text.endswith(
        "Patient-level answer: **tumor suspected** (mean of the 2 largest slice P(tumor) = 0.510, at or above the "
        "threshold 0.400; aggregation `top_k_mean`, top 2); calibrated likelihood 25 % (isotonic, fitted on val: 40 "
        "volumes of MSD, NIH); raw score 0.510. Assessed: 2 of 5 slices got a pancreas box; P(tumor) "
        "computed on 2 (2 on the pancreas crop); tumor box asked on 2 slices, found on 2. Input checks: no check "
        "failed: 1 passed, 6 unknown (modality, slice_thickness, pixel_spacing, orientation, hu_sanity, contrast).")


def test_inconclusive_with_too_few_boxed_slices_says_how_many(tmp_path):
    """A pipeline that requires more boxed slices than it got (decision "inconclusive" with one
    boxed slice) is reported as such: neither "no pancreas found on any slice" nor "no tumor"."""
    from minigpt4.demo.service import ScanResult
    from minigpt4.inference.pipeline import PatientResult, SliceResult

    rows = [SliceResult(0, "{<0><0><0><0>}"),
            SliceResult(1, "{<25><25><75><75>}", (25, 25, 75, 75), (16.0, 16.0, 48.0, 48.0), (16, 16, 48, 48), 0.2),
            SliceResult(2, "{<0><0><0><0>}")]
    patient = PatientResult(score=0.2, aggregation="max", top_k=3, threshold=0.5, decision="inconclusive",
                            n_slices_boxed=1)
    assert ScanResult(rows, patient).patient_text() == (
        "Patient-level answer: **inconclusive: a pancreas box on only 1 of 3 slices** — this is not a negative "
        "result: too little of the pancreas was looked at, so the threshold 0.500 (aggregation `max`) was not "
        "applied. Assessed: 1 of 3 slices got a pancreas box; P(tumor) computed on 1 (1 on the pancreas crop); "
        "tumor box asked on 0 slices, found on 0.")


def test_single_checkpoint_scan_without_any_box_is_inconclusive(tmp_path):
    model = ScriptedStage()
    service = DemoService(model)  # one checkpoint: whole slices are classified when no box is found
    text, _, _ = scan_through_handlers(service, [10, 60, 90], tmp_path)
    assert text == (
        "Scanned 3 slices. Most suspicious: **slice 2**, P(tumor) = 0.353 (classified on the whole slice). Boxes: "
        "tumor in red, pancreas in cyan. The viewer now shows that slice. **inconclusive: no pancreas found on any "
        "slice** — this is not a negative result: the model never looked at a pancreas; P(tumor) came from whole "
        "slices only, outside the classifier's training distribution. Assessed: 0 of 3 slices got a pancreas box; "
        "P(tumor) computed on 3 (0 on the pancreas crop, 3 on the whole slice); tumor box asked on 3 slices, found on 0. "
        "Input checks: no check failed: 0 passed, 7 unknown (modality, slice_thickness, pixel_spacing, orientation, "
        "hu_sanity, z_coverage, contrast).")
    assert "no tumor" not in text.lower()
    text, _, _ = scan_through_handlers(service, [10, 160, 90], tmp_path)
    assert text.endswith("Assessed: 1 of 3 slices got a pancreas box; P(tumor) computed on 3 (1 on the pancreas crop, "
                         "2 on the whole slice); tumor box asked on 3 slices, found on 1. Input checks: no check failed: "
                         "1 passed, 6 unknown (modality, slice_thickness, pixel_spacing, orientation, hu_sanity, contrast).")
    assert "inconclusive" not in text


def test_scan_endpoint_summary_of_an_inconclusive_volume(tmp_path):
    service, _ = three_stage_service(threshold=0.5)
    volume = np.tile(np.arange(64, dtype=np.int16)[:, None, None] * 10 - 1000, (1, 64, 4))  # all below the window
    summary, rows, image = DemoHandlers(service, tmp_path).api_scan(str(write_nifti(tmp_path / "v.nii.gz", volume)), "window")
    assert summary.startswith("v.nii.gz: 4 slices scanned; no slice was classified. Patient-level answer: "
                              "inconclusive: no pancreas found on any slice — this is not a negative result")
    assert "no tumor" not in summary.lower() and [r["p_tumor"] for r in rows] == [None] * 4 and image is not None


# ------------------------------------------------------------------------------------------------
# startup


def test_a_stage_loading_error_is_one_error_line_and_exit_2(tmp_path, monkeypatch, capsys):
    """demo.py in three-stage mode, when load_stages refuses a checkpoint (e.g. the wrong task):
    one ``demo.py: error:`` line, exit status 2, no traceback."""
    from minigpt4 import cli
    from minigpt4.demo import service as service_module
    from minigpt4.models import stages as stage_module

    folders = {}
    for stage in ("pancreas_detection", "tumor_classification", "tumor_detection"):
        folders[stage] = tmp_path / stage
        folders[stage].mkdir()
    message = (f"cascade.stages.tumor_classification {folders['tumor_classification']}: the checkpoint's task is "
               "pancreas_detection, expected tumor_classification")

    def refuse(*args, **kwargs):
        raise ValueError(message)

    monkeypatch.setattr(stage_module, "load_stages", refuse)
    monkeypatch.setattr(service_module, "load_stages", refuse)  # bound where it is used
    demo = import_demo_entry_point()
    options = [f"cascade.stages.{stage}={folder}" for stage, folder in folders.items()]
    status = cli.run_main(demo.main, ["--cfg-path", str(REPO / "eval_configs" / "demo_cpu.yaml"), "--options", *options],
                          prog="demo.py")
    captured = capsys.readouterr()
    assert status == 2
    assert captured.err.splitlines() == [f"demo.py: error: {message}"]
    assert "private temp folder" not in captured.out  # refused before any server or temp folder
