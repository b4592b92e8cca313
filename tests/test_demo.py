"""The demo without a server: uploads, box drawing, answers, volume scan, handlers, safety.

A scripted test double stands in for the model where exact answers are needed (a known box in,
a known red rectangle out); the real tiny model is exercised by tests/test_demo_e2e.py.
"""

from __future__ import annotations

import re
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from minigpt4.data.transforms import ImageTransform
from minigpt4.demo.app import DemoHandlers, build_app, parse_size
from minigpt4.demo.service import QUICK_TASKS, DemoService, make_private_workdir
from minigpt4.drawing import RED, annotate, display_scale
from minigpt4.inference.readers import InputError, Limits, load_slice, load_volume, upload_kind

REPO = Path(__file__).resolve().parents[1]


def import_demo_entry_point():
    """demo.py by path (the repository root need not be on sys.path)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo_entry_point", REPO / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class ScriptedModel:
    """Test double of MiniGPTPancreas: fixed answers per instruction, P(yes) from image brightness.

    ``yes_probability`` returns the mean of channel 0 of each (normalised) image passed through a
    sigmoid, so brighter inputs are "more suspicious"; every call is recorded.
    """

    def __init__(self, answers: dict[str, str], image_size: int = 32) -> None:
        self.answers = answers
        self.image_transform = ImageTransform(image_size)
        self.calls: list[tuple] = []

    def encode_tower(self, images):
        """The "tower tokens" of the double are its images (the pipeline encodes once, then generates)."""
        self.calls.append(("encode_tower", tuple(images.shape)))
        return images

    def generate(self, images, instructions, max_new_tokens=None, tower_tokens=None):
        images = tower_tokens if images is None else images
        self.calls.append(("generate", tuple(images.shape), list(instructions), max_new_tokens))
        return [self.answers.get(i, "I do not know") for i in instructions]

    def yes_probability(self, images, questions):
        self.calls.append(("yes_probability", images.clone(), list(questions)))
        return torch.sigmoid(images[:, 0].mean(dim=(1, 2)))


PANCREAS_Q = "[refer] Give me the location of the pancreas"
TUMOR_Q = "[refer] Give me the location of the pancreatic tumor"
YES_Q = "[vqa] Does the pancreas in the image present a tumor?"


def gray_slice(width: int = 200, height: int = 100) -> np.ndarray:
    """A body-like ellipse (value 120) with a brighter block, on black."""
    yy, xx = np.mgrid[:height, :width]
    image = np.where(((xx - width / 2) / (width * 0.4)) ** 2 + ((yy - height / 2) / (height * 0.4)) ** 2 < 1, 120, 0)
    image[height // 2 - 5 : height // 2 + 5, width // 2 - 10 : width // 2 + 10] = 200
    return image.astype(np.uint8)


def save(tmp_path: Path, name: str, image) -> Path:
    path = tmp_path / name
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(path)
    return path


# ------------------------------------------------------------------------------------------------
# prompts of the task buttons


def test_quick_tasks_use_the_paper_prompts():
    assert {k: v[1] for k, v in QUICK_TASKS.items()} == {
        "pancreas": "[refer] Give me the location of the pancreas",
        "tumor_yes_no": "[vqa] Does the pancreas in the image present a tumor?",
        "tumor": "[refer] Give me the location of the pancreatic tumor",
        "liver": "[refer] Give me the location of the liver",
        "kidney": "[refer] Give me the location of the kidney",
        "spleen": "[refer] Give me the location of the spleen",
    }


# ------------------------------------------------------------------------------------------------
# uploads


def test_load_slice_grayscale_png_is_returned_unchanged(tmp_path):
    image = gray_slice()
    assert np.array_equal(load_slice(save(tmp_path, "s.png", image)), image)


def test_load_slice_accepts_gray_saved_as_rgb_jpeg(tmp_path):
    image = gray_slice()
    path = tmp_path / "s.jpg"
    Image.fromarray(image).convert("RGB").save(path, quality=90)
    loaded = load_slice(path)
    assert loaded.shape == (100, 200) and loaded.dtype == np.uint8
    assert np.abs(loaded.astype(int) - image).mean() < 3  # JPEG noise only


def test_load_slice_stretches_16_bit(tmp_path):
    image = np.zeros((40, 40), np.uint16)
    image[:, 20:] = 1000
    loaded = load_slice(save(tmp_path, "s16.png", Image.fromarray(image)))
    assert set(np.unique(loaded)) == {0, 255}


def test_unsupported_type(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(InputError, match="notes.txt: unsupported file type"):
        load_slice(path)
    assert upload_kind(tmp_path / "a.PNG") == "slice" and upload_kind(tmp_path / "v.nii.gz") == "volume"


def test_bad_slice_uploads_give_clear_messages(tmp_path):
    colour = np.zeros((64, 64, 3), np.uint8)
    colour[..., 0] = 200  # a red picture
    cases = {
        save(tmp_path, "photo.png", colour): "photo.png: this looks like a colour picture",
        save(tmp_path, "blank.png", np.full((64, 64), 77, np.uint8)): "blank.png: the image is blank",
        save(tmp_path, "tiny.png", gray_slice(20, 20)): r"tiny.png: 20×20 pixels is outside the accepted size",
    }
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    cases[corrupt] = "corrupt.png: cannot be read as an image"
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    cases[empty] = "empty.jpg: the file is empty"
    for path, message in cases.items():
        with pytest.raises(InputError, match=re.escape(message) if "×" not in message else message):
            load_slice(path)
    big = save(tmp_path, "big.png", gray_slice())
    with pytest.raises(InputError, match="big.png: .* MB is over the demo's limit"):
        load_slice(big, Limits(max_slice_bytes=100))


# ------------------------------------------------------------------------------------------------
# drawing


def test_annotate_draws_a_red_rectangle_at_the_box():
    image = gray_slice(200, 100)
    out = np.asarray(annotate(image, [((20.0, 20.0, 100.0, 80.0), RED)]))
    assert out.shape == (100, 200, 3)
    # the outline is 2 px wide (min side 100 / 200 → at least 2) on the box edges
    for x, y in [(20, 50), (21, 50), (100, 50), (99, 50), (60, 20), (60, 21), (60, 80), (60, 79)]:
        assert tuple(out[y, x]) == RED, (x, y)
    for x, y in [(22, 50), (60, 22), (60, 50), (19, 50), (60, 81)]:
        assert tuple(out[y, x]) == (image[y, x],) * 3, (x, y)
    # no box: an RGB copy of the slice
    assert np.array_equal(np.asarray(annotate(image))[..., 1], image)


def test_annotate_zoom_scales_image_and_box():
    image = gray_slice(64, 32)
    out = np.asarray(annotate(image, [((8.0, 8.0, 24.0, 24.0), RED)], scale=3))
    assert out.shape == (96, 192, 3)
    assert tuple(out[40, 24]) == RED and tuple(out[40, 27]) != RED  # x1 = 8 → 24, 2 px line
    assert np.array_equal(out[::3, ::3, 1][30:], image[30:])  # nearest-neighbour zoom
    assert display_scale(128, 128) == 3 and display_scale(512, 512) == 1 and display_scale(100, 200) == 2


def test_pancreas_crop_is_the_crop_preprocessing_tc_cuts():
    from minigpt4.boxes import grid_to_pixel_inclusive
    from minigpt4.inference.pipeline import pancreas_crop
    from preprocessing.tc import crop_box

    image = np.arange(50 * 50).reshape(50, 50)
    # grid 10..31 of 50 px: inclusive pixels x 5..15, y 10..20 (hand-computed), margin 2 → 3..17, 8..22
    assert grid_to_pixel_inclusive((10, 20, 31, 40), 50, 50) == (5, 10, 15, 20)
    assert np.array_equal(pancreas_crop(image, "{<10><20><31><40>}"), image[10:21, 5:16])
    assert np.array_equal(pancreas_crop(image, "{<10><20><31><40>}", margin=2), image[8:23, 3:18])
    x1, y1, x2, y2 = crop_box((5, 10, 15, 20), 50, 50, margin=2)
    assert (x1, y1, x2, y2) == (3, 8, 17, 22)
    assert np.array_equal(pancreas_crop(image, "{<0><0><100><100>}", margin=3), image)  # clipped to the slice
    for no_box in ("{<0><0><0><0>}", "{<40><40><40><90>}", "no idea"):
        assert pancreas_crop(image, no_box) is None, no_box


# ------------------------------------------------------------------------------------------------
# answers


def make_service(answers=None, **kwargs) -> tuple[DemoService, ScriptedModel]:
    model = ScriptedModel(answers or {})
    return DemoService(model, max_new_tokens=20, text_max_new_tokens=64, **kwargs), model


def test_detection_answer_in_pixels_and_greedy_budget():
    service, model = make_service({PANCREAS_Q: "{<10><20><50><80>}"})
    answer = service.ask(gray_slice(200, 100), PANCREAS_Q)
    assert answer.task == "detection"
    assert answer.grid_box == (10, 20, 50, 80)
    assert answer.pixel_box == (20.0, 20.0, 100.0, 80.0)  # x * 200 / 100, y * 100 / 100
    assert "**[20, 20, 100, 80]**" in answer.message and "200×100" in answer.message
    assert "`{<10><20><50><80>}`" in answer.message
    assert model.calls == [("generate", (1, 3, 32, 32), [PANCREAS_Q], 20)]
    red = np.asarray(service.annotated(gray_slice(200, 100), answer))
    assert tuple(red[50, 20]) == RED


def test_empty_box_unparseable_and_questions():
    service, model = make_service({
        TUMOR_Q: "{<0><0><0><0>}",
        PANCREAS_Q: "somewhere in the middle",
        YES_Q: "yes",
        "describe the image": "a CT slice",
    })
    image = gray_slice()
    empty = service.ask(image, TUMOR_Q)
    assert "target absent" in empty.message and service.answer_boxes(empty) == []
    none = service.ask(image, PANCREAS_Q)
    assert none.grid_box is None and service.answer_boxes(none) == []
    assert none.message.startswith("Not a valid box answer: the scoring rule needs exactly four numbers, this answer has 0;")
    # the release's rule: reversed corners are read as written, zero area, nothing drawn
    service.model.answers[PANCREAS_Q] = "{<50><80><10><20>}"
    reversed_box = service.ask(image, PANCREAS_Q)
    assert reversed_box.grid_box == (50, 80, 10, 20)
    assert np.array_equal(np.asarray(service.annotated(image, reversed_box)), np.asarray(service.annotated(image, None)))
    assert "corners are reversed or equal (zero area)" in reversed_box.message
    question = service.classify(image)
    assert question.instruction == YES_Q and question.task == "question"
    assert 0.0 < question.p_yes < 1.0
    assert question.message.startswith("**yes** — model probability P(yes) = ")
    free = service.ask(image, "describe the image")
    assert free.message == "a CT slice" and free.p_yes is None
    assert model.calls[-1][3] == 64  # free text gets the longer budget


def test_instruction_checks():
    service, _ = make_service()
    with pytest.raises(InputError, match="Type a question"):
        service.ask(gray_slice(), "   ")
    with pytest.raises(InputError, match="501 characters; the limit is 500"):
        service.ask(gray_slice(), "x" * 501)


# ------------------------------------------------------------------------------------------------
# volumes


def write_nifti(path: Path, array: np.ndarray, affine=None) -> Path:
    import nibabel as nib

    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
    return path


def zipped_dicom_series(path: Path, hu: np.ndarray, spacing, folder: str = "") -> Path:
    """A phantom written as a DICOM series (preprocessing.synthetic) and zipped, members sorted,
    under ``folder/`` inside the archive."""
    from preprocessing import synthetic

    files = path.with_suffix(".dcm.d")
    synthetic.write_dicom_series(files, hu, spacing, "P1", 1)
    with zipfile.ZipFile(path, "w") as archive:
        for file in sorted(files.rglob("*.dcm")):
            archive.write(file, str(Path(folder) / file.relative_to(files)) if folder else file.relative_to(files))
    return path


def test_load_volume_reorients_from_the_affine(tmp_path):
    # stored RAS (identity affine): voxel i grows to the patient's right, j to anterior.
    # A marker in the most right-anterior voxel must land top-left (radiological display).
    array = np.full((40, 50, 3), -1000, np.int16)
    array[39, 49, 1] = 400
    volume = load_volume(write_nifti(tmp_path / "ras.nii.gz", array), "window")
    assert volume.slices.shape == (3, 50, 40) and volume.slices.dtype == np.uint8
    assert volume.slices[1, 0, 0] == 255 and int(volume.slices.sum()) == 255
    # the same anatomy stored LPS (x and y flipped): same display
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    lps[:2, 3] = 39, 49
    flipped = load_volume(write_nifti(tmp_path / "lps.nii", array[::-1, ::-1].copy(), lps), "window")
    assert np.array_equal(flipped.slices, volume.slices)


def test_dicom_zip_and_nifti_give_the_training_slices(tmp_path):
    """A phantom stored as a zipped DICOM series and as an LPS NIfTI: both must display exactly
    the preprocessing normalisation of the display-frame phantom, slice by slice."""
    from preprocessing import synthetic
    from preprocessing.normalize import normalize_slice

    hu, _, spacing = synthetic.phantom(size=64, n_slices=6, seed=1)
    archive_path = zipped_dicom_series(tmp_path / "series.zip", hu, spacing)
    array, affine = synthetic.stored(hu, spacing, "LPS")
    synthetic.write_nifti(tmp_path / "lps.nii.gz", array, affine)
    for method in ("paper", "window"):
        expected = np.stack([normalize_slice(hu[:, :, k], method) for k in range(6)])
        assert np.array_equal(load_volume(archive_path, method, workdir=tmp_path).slices, expected)
        assert np.array_equal(load_volume(tmp_path / "lps.nii.gz", method).slices, expected)


def test_bad_volumes(tmp_path):
    constant = write_nifti(tmp_path / "const.nii.gz", np.zeros((40, 40, 4), np.int16))
    with pytest.raises(InputError, match="const.nii.gz: the volume is empty"):
        load_volume(constant)
    truncated = tmp_path / "cut.nii.gz"
    truncated.write_bytes(write_nifti(tmp_path / "full.nii.gz", np.ones((40, 40, 4), np.int16)).read_bytes()[:60])
    with pytest.raises(InputError, match="cut.nii.gz: "):
        load_volume(truncated)
    with pytest.raises(InputError, match="unknown normalisation 'minmax'"):
        load_volume(constant, "minmax")
    too_many = write_nifti(tmp_path / "long.nii", np.arange(40 * 40 * 5, dtype=np.int16).reshape(40, 40, 5))
    with pytest.raises(InputError, match="long.nii: 5 slices, over the demo's limit of 4"):
        load_volume(too_many, limits=Limits(max_slices=4))


def test_dicom_zips_are_extracted_safely(tmp_path):
    workdir = tmp_path / "work"
    workdir.mkdir()
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as archive:
        archive.writestr("../../escaped.dcm", b"not dicom")
        archive.writestr("series/readme.txt", b"hello")
    with pytest.raises(InputError, match="evil.zip: no DICOM image files found"):
        load_volume(evil, workdir=workdir)
    assert not (tmp_path / "escaped.dcm").exists() and not (tmp_path.parent / "escaped.dcm").exists()
    assert list(workdir.iterdir()) == []  # extraction folder removed
    empty = tmp_path / "empty.zip"
    zipfile.ZipFile(empty, "w").close()
    with pytest.raises(InputError, match="empty.zip: the zip archive is empty"):
        load_volume(empty, workdir=workdir)
    fake = tmp_path / "fake.zip"
    fake.write_bytes(b"PK not really")
    with pytest.raises(InputError, match="fake.zip: not a readable zip archive"):
        load_volume(fake, workdir=workdir)
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("a.dcm", b"\0" * 100_000)
    with pytest.raises(InputError, match="bomb.zip: 0 MB uncompressed, over the limit"):
        load_volume(bomb, limits=Limits(max_unzipped_bytes=50_000), workdir=workdir)


def nifti_header_only(path: Path, shape: tuple, dtype, affine=None) -> Path:
    """A ``.nii.gz`` whose header declares ``shape`` but holds no voxels: reading the header is
    free, decoding would need ``prod(shape)`` voxels (the 1.5 MB file of zeros from issue 14)."""
    import gzip

    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_qform(np.eye(4) if affine is None else affine, code=1)
    header.set_sform(np.eye(4) if affine is None else affine, code=1)
    path.write_bytes(gzip.compress(header.binaryblock + b"\0" * 4 + b"\0" * 64))
    return path


def test_volume_headers_are_checked_before_any_voxel_is_decoded(tmp_path, monkeypatch):
    import tracemalloc

    from minigpt4.inference import readers as volume_io

    def no_decoding(*args, **kwargs):
        raise AssertionError("the volume was decoded before its header was checked")

    monkeypatch.setattr(volume_io, "read_display_volume", no_decoding)
    zeros = nifti_header_only(tmp_path / "zeros.nii.gz", (512, 512, 2100), np.uint8)
    tracemalloc.start()
    with pytest.raises(InputError, match=r"^zeros.nii.gz: 2100 slices, over the demo's limit of 2000\.$"):
        load_volume(zeros)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 20 * 1024**2  # the header only, not 550 MB of voxels
    # within the slice and size limits but over the memory budget: 1024² × 1000 int16 × 9 bytes
    big = nifti_header_only(tmp_path / "big.nii.gz", (1024, 1024, 1000), np.int16)
    with pytest.raises(InputError, match=r"^big.nii.gz: 1000 slices of 1024×1024 pixels need about 8.8 GB of "
                                         r"memory to decode, over the demo's budget of 4.0 GB\.$"):
        load_volume(big)
    # the slice axis is the stored axis closest to head-feet (here the first), as in the display
    sagittal_first = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], float)
    tall = nifti_header_only(tmp_path / "tall.nii.gz", (2100, 64, 64), np.int16, sagittal_first)
    with pytest.raises(InputError, match="tall.nii.gz: 2100 slices, over"):
        load_volume(tall)
    with pytest.raises(InputError, match="rgb.nii.gz: voxel type .* is not a CT intensity"):
        load_volume(nifti_header_only(tmp_path / "rgb.nii.gz", (64, 64, 4), np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")])))

    # DICOM: file count × Rows × Columns from the headers (stop_before_pixels), before decoding
    from preprocessing import synthetic

    hu, _, spacing = synthetic.phantom(size=64, n_slices=6, seed=1)
    series = zipped_dicom_series(tmp_path / "series.zip", hu, spacing)
    with pytest.raises(InputError, match=r"^series.zip: 6 slices, over the demo's limit of 5\.$"):
        load_volume(series, limits=Limits(max_slices=5), workdir=tmp_path)
    # 6 × 64 × 64 voxels × 9 bytes = 221,184 bytes
    with pytest.raises(InputError, match=r"series.zip: 6 slices of 64×64 pixels need about 0.2 MB .* budget of 0.1 MB"):
        load_volume(series, limits=Limits(max_decode_bytes=100_000), workdir=tmp_path)
    with pytest.raises(InputError, match=r"series.zip: slices of 64×64 pixels are outside the accepted size \(80–"):
        load_volume(series, limits=Limits(min_side=80), workdir=tmp_path)


def test_volume_errors_do_not_reveal_private_paths(tmp_path, monkeypatch):
    import nibabel as nib

    uploads = tmp_path / "gradio" / "3f2a9c"  # where Gradio keeps an upload
    uploads.mkdir(parents=True)
    full = uploads / "full.nii"
    nib.save(nib.Nifti1Image(np.ones((40, 40, 4), np.int16), np.eye(4)), str(full))
    cut = uploads / "cut.nii"
    cut.write_bytes(full.read_bytes()[:2000])  # nibabel: "Expected 12800 bytes, got ... from <path>"
    with pytest.raises(InputError) as truncated:
        load_volume(cut, workdir=tmp_path)
    assert str(truncated.value).startswith("cut.nii: ") and str(tmp_path) not in str(truncated.value)
    # any reader failure naming an extracted file: the zip member's name, not the temp path
    from minigpt4.inference import readers as volume_io
    from preprocessing import synthetic

    hu, _, spacing = synthetic.phantom(size=64, n_slices=4, seed=1)
    series = zipped_dicom_series(uploads / "series.zip", hu, spacing, folder="study")
    first_member = zipfile.ZipFile(series).namelist()[0]

    def failing_reader(folder, name, *args):
        raise RuntimeError(f"bad pixel data in {sorted(Path(folder).iterdir())[0]}")  # an extracted file

    monkeypatch.setattr(volume_io, "read_display_volume", failing_reader)
    with pytest.raises(InputError) as failed:
        load_volume(series, workdir=tmp_path)
    assert str(failed.value) == (f"series.zip: cannot read the volume (RuntimeError: bad pixel data in "
                                 f"series.zip:{first_member}).")


def scan_volume_array() -> np.ndarray:
    """5 slices of 64×64; slice 3 has a bright block in the centre (inside the pancreas box)."""
    slices = np.stack([gray_slice(64, 64) for _ in range(5)])
    slices[3, 24:40, 24:40] = 255
    return slices


def test_scan_volume_finds_the_most_suspicious_slice_on_pancreas_crops():
    service, model = make_service({PANCREAS_Q: "{<25><25><75><75>}", TUMOR_Q: "{<40><40><60><60>}"}, scan_batch_size=2)
    seen = []
    result = service.scan_volume(scan_volume_array(), progress=lambda f, d: seen.append(f))
    assert [r.slice_index for r in result.rows] == [0, 1, 2, 3, 4]
    assert result.most_suspicious == 3
    assert all(r.classified_on == "pancreas crop" for r in result.rows)
    assert result.rows[3].pancreas_box == (16.0, 16.0, 48.0, 48.0)
    assert result.rows[3].tumor_box == (25.6, 25.6, 38.4, 38.4)
    assert seen == [0.0, 0.4, 0.8, 1.0]
    # the classifier saw the crop preprocessing tc cuts for grid 25..75 of 64 px (inclusive pixels
    # 16..48), not the whole slice
    crops = torch.cat([c[1] for c in model.calls if c[0] == "yes_probability"])
    expected = model.image_transform(Image.fromarray(scan_volume_array()[3, 16:49, 16:49]))
    assert torch.allclose(crops[3], expected)
    assert [c[2] for c in model.calls if c[0] == "generate"][:2] == [[PANCREAS_Q] * 2, [TUMOR_Q] * 2]
    assert result.rows[3].as_dict() == {
        "slice": 3, "p_tumor": round(result.rows[3].p_tumor, 4), "classified_on": "pancreas crop",
        "pancreas_box": [16.0, 16.0, 48.0, 48.0], "tumor_box": [25.6, 25.6, 38.4, 38.4], "p_no_box": None,
        "pancreas_kept": True,
        "pancreas_answer": "{<25><25><75><75>}", "tumor_answer": "{<40><40><60><60>}",
    }


def test_scan_without_pancreas_box_classifies_the_whole_slice():
    service, _ = make_service({PANCREAS_Q: "no idea"})
    result = service.scan_volume(scan_volume_array())
    assert {r.classified_on for r in result.rows} == {"whole slice"}
    assert result.rows[0].pancreas_box is None and result.rows[0].tumor_box is None


# ------------------------------------------------------------------------------------------------
# handlers (the UI's events, called directly)


@pytest.fixture()
def handlers(tmp_path):
    service, model = make_service({PANCREAS_Q: "{<10><20><50><80>}", TUMOR_Q: "{<40><40><60><60>}"})
    return DemoHandlers(service, tmp_path), model


def test_upload_and_ask_through_the_handlers(tmp_path, handlers):
    h, _ = handlers
    path = save(tmp_path, "slice.png", gray_slice(200, 100))
    state, viewer, slider, history, plot, table = h.on_upload(str(path), "paper", [], None)
    assert state["kind"] == "slice" and state["slices"].shape == (1, 100, 200)
    assert viewer.size == (400, 200) and slider["visible"] is False  # zoomed ×2 in the viewer
    assert history[-1]["role"] == "assistant" and "Loaded slice **slice.png** (200×100)" in history[-1]["content"]
    history, viewer, cleared = h.on_ask(QUICK_TASKS["pancreas"][1], history, state)
    assert cleared == ""
    assert history[-2] == {"role": "user", "content": PANCREAS_Q}
    assert "**[20, 20, 100, 80]**" in history[-1]["content"]
    assert tuple(np.asarray(viewer)[100, 40]) == RED  # box x1 = 20 px → 40 in the ×2 view
    history, _, kept = h.on_ask("", history, state)
    assert "Type a question" in history[-1]["content"] and kept == ""


def test_bad_uploads_become_chat_messages(tmp_path, handlers):
    h, _ = handlers
    bad = tmp_path / "scan.txt"
    bad.write_text("not an image")
    state, viewer, _, history, _, _ = h.on_upload(str(bad), "paper", [{"role": "user", "content": "hi"}], None)
    assert viewer is None and state["slices"] is None
    assert history[0] == {"role": "user", "content": "hi"}
    assert history[-1]["content"].startswith("⚠️ scan.txt: unsupported file type")
    history, viewer, _ = h.on_ask(PANCREAS_Q, history, state)
    assert history[-1]["content"] == "⚠️ Upload a CT slice or volume first."
    _, _, _, _, _, history, files = h.on_scan(history, state)
    assert files is None
    assert history[-1]["content"].startswith("⚠️ Scan needs a CT volume")


def test_model_failures_become_chat_messages(tmp_path, handlers):
    h, model = handlers

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    model.generate = broken
    state, *_ = h.on_upload(str(save(tmp_path, "s.png", gray_slice())), "paper", [], None)
    history, viewer, kept = h.on_ask(PANCREAS_Q, [], state)
    assert "could not process this request (RuntimeError: CUDA out of memory)" in history[-1]["content"]
    assert viewer is not None and kept == PANCREAS_Q  # the slice stays, the question can be resent
    text, image = h.api_ask(str(save(tmp_path, "t.png", gray_slice())), PANCREAS_Q)
    assert "RuntimeError" in text and image is None


def test_volume_upload_slider_and_scan(tmp_path, handlers):
    h, _ = handlers
    slices = scan_volume_array().astype(np.int16) * 2 - 260  # HU: 255 → 250 (window top), 0 → -260
    array = np.transpose(slices, (2, 1, 0))[::-1, ::-1]  # display → stored RAS (x, y, z)
    path = write_nifti(tmp_path / "vol.nii.gz", np.ascontiguousarray(array))
    state, viewer, slider, history, _, _ = h.on_upload(str(path), "window", [], None)
    assert state["kind"] == "volume" and state["slices"].shape == (5, 64, 64)
    assert slider["visible"] is True and slider["maximum"] == 4 and slider["value"] == 2
    assert "5 axial slices of 64×64" in history[-1]["content"]
    state, viewer = h.on_slider(3, state)
    assert viewer.size == (384, 384)  # 64 px zoomed ×6
    assert state["index"] == 3 and np.asarray(viewer)[32 * 6, 32 * 6, 0] == 255  # the bright block
    state, viewer, slider, plot, table, history, files = h.on_scan(history, state)
    assert slider["value"] == 3 and state["index"] == 3
    assert "Most suspicious: **slice 3**" in history[-1]["content"]
    assert len(table) == 5 and table[3][:3] == [3, table[3][1], "pancreas crop"]
    assert table[3][3:] == ["[6, 13, 32, 51]", "[26, 26, 38, 38]"]  # grid × 64 / 100
    assert plot is not None
    # the scan's tumor box is drawn in red on the displayed slice
    assert tuple(np.asarray(viewer)[30 * 6, 154]) == RED  # x1 = 25.6 px → 153.6 in the ×6 view
    # the scan's files, as scan.py writes them, in the upload's own geometry (single checkpoint:
    # no patient answer)
    import json

    import nibabel as nib

    assert [Path(f).name for f in files] == ["report.json", "boxes.nii.gz", "montage.png", "report.html"]
    assert all(Path(f).is_relative_to(tmp_path) for f in files)  # the private workdir
    # one checkpoint: no patient score, so no likelihood; fitness not recorded by this scan
    assert history[-1]["content"].endswith("\n\nAmong the scan files below: `report.html` (a page to read).")
    assert "likelihood" not in history[-1]["content"].lower()  # no patient answer, so no likelihood
    assert str(tmp_path) not in Path(files[3]).read_text()
    report = json.loads(Path(files[0]).read_text(), parse_constant=lambda name: pytest.fail(name))
    assert report["volume"] == "vol" and report["patient"] is None and len(report["slices"]) == 5
    # grid 40..60 of 64 px as inclusive pixels: ceil(40·0.64) = 26 .. ceil(61·0.64) − 1 = 39
    assert report["slices"][3]["tumor_box"]["pixels"] == [26, 26, 39, 39]
    boxes, source = nib.load(files[1]), nib.load(str(path))
    assert boxes.shape == source.shape and np.allclose(boxes.affine, source.affine)
    label = np.asarray(boxes.dataobj)
    assert int((label == 2).sum()) == 5 * 14 * 14  # the tumor box on every slice (threshold 0 with one checkpoint)
    summary, rows, image = h.api_scan(str(path), "window")
    assert "5 slices scanned; most suspicious slice 3" in summary and rows[3]["slice"] == 3
    assert image.size == (64, 64)


def test_three_stage_scan_through_the_handlers_gives_the_patient_answer(tmp_path):
    """Three-stage mode (the scripted model stands in for every stage): the scan's chat message
    ends with the patient answer, the plot shows the threshold; no pancreas box → inconclusive."""
    from minigpt4.inference.pipeline import CascadeSettings, SingleModel

    state = {"kind": "volume", "slices": scan_volume_array(), "index": 0, "name": "vol.nii.gz"}
    for answer, expected in [("{<25><25><75><75>}", "Patient-level answer: **tumor suspected** on the 5 slices where a "
                                                     "pancreas was found (largest slice P(tumor) = "),
                             ("no idea", "Patient-level answer: **inconclusive: no pancreas found on any slice** — this is not a negative")]:
        model = ScriptedModel({PANCREAS_Q: answer, TUMOR_Q: "{<40><40><60><60>}"})
        service = DemoService(model, stages=SingleModel(model), cascade=CascadeSettings(threshold=0.5))
        _, _, slider, plot, table, history, _ = DemoHandlers(service, tmp_path).on_scan([], dict(state))
        assert expected in history[-1]["content"] and plot is not None and len(table) == 5


def report_score(path) -> str:
    import json

    return f"{json.loads(Path(path).read_text())['patient']['score']:.3f}"


def test_scan_of_a_dicom_upload_offers_report_boxes_and_seg(tmp_path):
    """Three-stage mode on a zipped DICOM series: the download holds report.json (patient
    answer), boxes.nii.gz over the series and a DICOM SEG referencing the uploaded images."""
    import hashlib
    import json

    import nibabel as nib
    import pydicom

    from minigpt4.inference.pipeline import CascadeSettings, SingleModel
    from minigpt4.scan_outputs import read_dicom_source
    from preprocessing import synthetic

    hu, _, spacing = synthetic.phantom(size=64, n_slices=4, seed=1)
    archive = zipped_dicom_series(tmp_path / "series.zip", hu, spacing)
    model = ScriptedModel({PANCREAS_Q: "{<25><25><75><75>}", TUMOR_Q: "{<40><40><60><60>}"})
    weights = tmp_path / "stage.safetensors"
    weights.write_bytes(b"weights")
    service = DemoService(model, stages=SingleModel(model), cascade=CascadeSettings(threshold=0.0),
                          checkpoints={"tumor_detection": str(weights)})
    workdir = tmp_path / "work"
    workdir.mkdir()
    h = DemoHandlers(service, workdir)
    state, *_ = h.on_upload(str(archive), "paper", [], None)
    *_, history, files = h.on_scan([], state)
    assert [Path(f).name for f in files] == ["report.json", "boxes.nii.gz", "seg.dcm", "montage.png", "sr.dcm",
                                             "report.html"], history[-1]
    # the likelihood said once, in the scan's own words, never as a percentage
    assert history[-1]["content"].count(f"uncalibrated score {report_score(files[0])}") == 1, history[-1]
    assert "%" not in history[-1]["content"]
    assert ("Among the scan files below: `report.html` (a page to read) and `sr.dcm` (a DICOM structured report "
            "for a PACS).") in history[-1]["content"]
    report = json.loads(Path(files[0]).read_text(), parse_constant=lambda name: pytest.fail(name))
    assert report["patient"]["decision"] == "tumor" and report["source"] == "series.zip"
    # issue 28: the uncalibrated score and the upload's fitness checks, in the file and in the chat
    assert report["patient"]["likelihood"] == {"raw": report["patient"]["score"], "calibrated": None, "calibration": None}
    status = {c["check"]: c["status"] for c in report["fitness"]}
    assert status == {"modality": "passed", "slice_thickness": "unknown", "pixel_spacing": "unknown",
                      "orientation": "passed", "hu_sanity": "passed", "z_coverage": "failed", "contrast": "unknown"}
    assert report["outside_validated_range"] is True  # boxes on every slice: the series may cut the pancreas off
    assert "**Outside the validated range** — the answer is given but was not validated for such a scan: " \
           "z_coverage: pancreas boxes reach the first and last slice" in history[-1]["content"]
    assert "uncalibrated score" in history[-1]["content"] and "%" not in history[-1]["content"]
    assert report["checkpoints"] == [{"stage": "tumor_detection", "path": weights.name,  # a name, not a server path
                                      "sha256": hashlib.sha256(b"weights").hexdigest()}]
    geometry, headers = read_dicom_source(tmp_path / "series.dcm.d")
    boxes = nib.load(files[1])
    assert boxes.shape == geometry.shape and np.allclose(boxes.affine, geometry.affine)
    seg = pydicom.dcmread(files[2])
    assert int(seg.NumberOfFrames) == 4 * 2  # every slice: pancreas box and tumor box
    referenced = {f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
                  for f in seg.PerFrameFunctionalGroupsSequence}
    assert referenced == {h.SOPInstanceUID for h in headers}
    sr = pydicom.dcmread(files[4])  # the SR beside it, in the same study (its content: tests/test_clinical_pages.py)
    assert sr.Modality == "SR" and sr.CurrentRequestedProcedureEvidenceSequence[0].StudyInstanceUID == seg.StudyInstanceUID


# ------------------------------------------------------------------------------------------------
# app construction and safety


def test_build_app_constructs_without_launching(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", "restored after the test")  # build_app sets it
    service, _ = make_service(warning="random weights", description="test double")
    app = build_app(service, workdir=tmp_path)
    public = {fn.api_name for fn in app.fns.values() if fn.api_visibility == "public"}
    assert public == {"ask", "classify", "scan_volume"}
    assert app.config is not None and not getattr(app, "is_running", False)
    assert app.analytics_enabled is False
    import os

    assert os.environ["GRADIO_TEMP_DIR"] == str(tmp_path / "gradio")


def test_private_ui_events_are_hidden_but_reachable_by_fn_index(tmp_path, monkeypatch):
    """docs/DEMO.md tells the truth about the UI's private events: hidden from the API and refused
    by gradio_client, yet reachable over HTTP by fn_index (as the browser calls them), acting only
    on the caller's own (empty) session."""
    import json
    import socket
    import urllib.request

    from gradio_client import Client

    from minigpt4.demo import app as app_module
    from minigpt4.demo.app import launch

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "restored"))  # build_app sets it
    service, _ = make_service()
    app = build_app(service, workdir=tmp_path)
    on_ask = next(i for i, fn in app.fns.items() if fn.name == "on_ask")
    assert app.fns[on_ask].api_visibility == "private"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launch(app, port=port, block=False, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        assert set(client.view_api(return_format="dict", print_info=False)["named_endpoints"]) == {
            "/ask", "/classify", "/scan_volume"}
        with pytest.raises(ValueError, match="Invalid function index"):
            client.predict("[vqa] hi", [], None, fn_index=on_ask)
        base = f"http://127.0.0.1:{port}/gradio_api"
        body = {"data": ["[vqa] hi", [], None], "fn_index": on_ask, "session_hash": "s14b", "event_data": None,
                "trigger_id": None}
        request = urllib.request.Request(base + "/queue/join", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=30).read()
        with urllib.request.urlopen(base + "/queue/data?session_hash=s14b", timeout=60) as stream:
            done = next(json.loads(line[5:]) for line in stream if b"process_completed" in line)
        assert "Upload a CT slice or volume first" in json.dumps(done["output"], ensure_ascii=False)
    finally:
        app.close()
    demo_doc = (REPO / "docs" / "DEMO.md").read_text()
    assert "not callable" not in demo_doc and "not callable" not in app_module.__doc__
    assert "refuses their\n`fn_index`" in demo_doc and "any HTTP client can too" in demo_doc


def test_private_workdir_is_user_only():
    workdir = make_private_workdir()
    try:
        assert stat.S_IMODE(workdir.stat().st_mode) == 0o700
        assert workdir.name.startswith("minigpt_pancreas_demo_") and len(workdir.name) > len("minigpt_pancreas_demo_") + 4
    finally:
        workdir.rmdir()


def test_cli_defaults_bind_localhost_without_share():
    demo = import_demo_entry_point()
    args = demo.parse_args(["--cfg-path", "eval_configs/demo_cpu.yaml"])
    assert (args.host, args.port, args.share) == ("127.0.0.1", 7860, False)
    assert demo.parse_args(["--cfg-path", "x.yaml", "--share"]).share is True
    assert parse_size("200mb") == 200 * 1024**2 and parse_size("1gb") == 1024**3 and parse_size("512") == 512
    with pytest.raises(ValueError, match="cannot read the size"):
        parse_size("lots")


def test_no_public_link_is_hard_coded():
    sources = [REPO / "demo.py", *(REPO / "minigpt4" / "demo").glob("*.py"), *(REPO / "minigpt4" / "inference").glob("*.py")]
    for source in sources:
        assert "share=True" not in source.read_text(), source


def test_configs_load_and_point_at_checkpoints():
    from minigpt4.config import load_config

    full = load_config(REPO / "eval_configs" / "demo.yaml")
    assert (full.model.text.path, full.model.vision.weights) == ("weights/Llama-2-7b-chat-hf", "weights/eva_vit_g.pth")
    assert full.model.ckpt == "output/stage3_tumor_detection/checkpoint_best"
    cpu = load_config(REPO / "eval_configs" / "demo_cpu.yaml")
    assert cpu.model.ckpt is None  # three-stage mode
    assert cpu.cascade.stages.configured() == {
        s: f"quickstart_output/runs/{run}/checkpoint_best" for s, run in (
            ("pancreas_detection", "stage1_pancreas_detection_cascade"), ("tumor_classification", "stage2_tumor_classification"),
            ("tumor_detection", "stage3_tumor_detection"))}
    assert cpu.model.text.path is None and cpu.run.device == "cpu"


def test_missing_checkpoint_full_size_is_an_error_tiny_is_a_warning(tmp_path, monkeypatch):
    from minigpt4.config import load_config
    from minigpt4.demo.service import load_service

    monkeypatch.chdir(tmp_path)  # relative checkpoint paths resolve against an empty folder
    full = load_config(REPO / "eval_configs" / "demo.yaml")
    with pytest.raises(FileNotFoundError, match="model.ckpt output/stage3_tumor_detection/checkpoint_best not found"):
        load_service(full)
    cpu = load_config(REPO / "eval_configs" / "demo_cpu.yaml")
    service = load_service(cpu)
    assert "random weights" in service.warning and "checkpoint_best" in service.warning
    answer = service.ask(gray_slice(), PANCREAS_Q)  # the random tiny model still answers
    assert isinstance(answer.text, str) and answer.task == "detection"
    cpu = load_config(REPO / "eval_configs" / "demo_cpu.yaml", ["cascade.crop_margin=3"])
    assert load_service(cpu).cascade.crop_margin == 3  # the volume scan crops like the TC folder


def test_main_reports_a_missing_checkpoint_cleanly(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    demo = import_demo_entry_point()
    assert demo.main(["--cfg-path", str(REPO / "eval_configs" / "demo.yaml")]) == 2
    assert "demo.py: error: model.ckpt output/stage3_tumor_detection/checkpoint_best not found" in capsys.readouterr().err
