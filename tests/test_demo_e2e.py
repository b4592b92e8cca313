"""End to end: ``python demo.py`` serving the tiny CPU model on localhost, driven by
``gradio_client`` and by headless Chromium (Playwright).

The server runs as a subprocess exactly as documented (``--cfg-path eval_configs/demo_cpu.yaml``,
a random free port, a checkpoint saved by :func:`minigpt4.models.checkpoints.save_checkpoint`).
The browser test writes ``test-artifacts/demo_e2e.png`` (gitignored) and skips when
``/usr/bin/chromium`` is missing (``.ci/run`` installs Debian's ``chromium``).
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
PANCREAS_Q = "[refer] Give me the location of the pancreas"
BOX_ANSWER = "{<40><50><60><70>}"
# on the 128×128 phantom slice: x = 40·1.28 = 51.2 → 51, y = 64, x2 = 76.8 → 77, y2 = 89.6 → 90
BOX_TEXT = "**[51, 64, 77, 90]**"
STARTUP_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def phantom_files(folder: Path) -> dict[str, Path]:
    """A synthetic CT phantom (preprocessing.synthetic): one slice through the pancreas as the
    training PNGs are written, the volume as NIfTI, and two bad uploads."""
    from preprocessing import synthetic
    from preprocessing.normalize import normalize_slice

    hu, label, spacing = synthetic.phantom(size=128, n_slices=8, seed=3)
    k = int(np.argmax((label > 0).sum(axis=(0, 1))))
    files = {"slice": folder / "phantom_slice.png", "volume": folder / "phantom.nii.gz"}
    Image.fromarray(normalize_slice(hu[:, :, k], "paper")).save(files["slice"])
    small, _, small_spacing = synthetic.phantom(size=64, n_slices=5, seed=4)
    array, affine = synthetic.stored(small, small_spacing, "LPS")
    synthetic.write_nifti(files["volume"], array, affine)
    files["text"] = folder / "notes.txt"
    files["text"].write_text("not an image")
    colour = np.zeros((96, 96, 3), np.uint8)
    colour[..., 1] = 180
    files["colour"] = folder / "holiday.png"
    Image.fromarray(colour).save(files["colour"])
    return files


def train_box_checkpoint(cfg, slice_png: Path, folder: Path) -> Path:
    """Overfit the tiny model (a few dozen AdamW steps, < 2 s) to answer BOX_ANSWER to the pancreas
    instruction on this slice, and save it with save_checkpoint. A server that answers this box
    has loaded the checkpoint: random weights never produce it."""
    import torch

    from minigpt4.models.checkpoints import save_checkpoint
    from minigpt4.models.minigpt_v2 import build_model

    torch.manual_seed(0)
    model = build_model(cfg.model, device="cpu")
    image = model.image_transform(Image.open(slice_png))[None]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for step in range(200):
        model.train()
        loss = model(image, [PANCREAS_Q], [BOX_ANSWER]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 9:
            model.eval()
            if model.generate(image, [PANCREAS_Q], max_new_tokens=cfg.model.generation.max_new_tokens) == [BOX_ANSWER]:
                break
    else:
        pytest.fail(f"the tiny model did not learn to answer {BOX_ANSWER} in 200 steps")
    save_checkpoint(model, folder, cfg)
    return folder


@contextlib.contextmanager
def serve(folder: Path, options: list[str]):
    """``python demo.py --cfg-path eval_configs/demo_cpu.yaml --options ...`` on a free port; yields (url, proc)."""
    port = free_port()
    log_path = folder / "server.log"
    env = dict(os.environ, OMP_NUM_THREADS="1", GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, str(REPO / "demo.py"), "--cfg-path", str(REPO / "eval_configs" / "demo_cpu.yaml"),
             "--port", str(port), "--options", *options],
            cwd=folder, stdout=log, stderr=subprocess.STDOUT, env=env,
        )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"demo.py exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"demo.py did not answer on {url} within {STARTUP_TIMEOUT_S} s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def browser_page(url: str):
    """Debian's headless Chromium (Playwright) on ``url``; yields the page."""
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright, tempfile.TemporaryDirectory() as profile:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1100},
        )
        try:
            page = context.new_page()
            page.goto(url)
            yield page
        finally:
            context.close()


def wait_for_scan_table(page, row_pattern: str, rows: int) -> None:
    """Wait until the scan table shows ``rows`` rows matching ``row_pattern`` (a JS regex) and the P(tumor) plot."""
    page.wait_for_function(
        "([pattern, rows]) => { const t = document.querySelector('#scan-table');"
        " return t && (t.innerText.match(new RegExp(pattern, 'g')) || []).length === rows; }",
        arg=[row_pattern, rows], timeout=30_000,
    )
    page.locator("#scan-plot img").wait_for(timeout=30_000)


@pytest.fixture(scope="module")
def server():
    """``python demo.py`` on 127.0.0.1:<free port> serving a saved tiny checkpoint."""
    import torch

    from minigpt4.config import load_config

    folder = Path(tempfile.mkdtemp(prefix="demo_e2e_"))
    files = phantom_files(folder)
    torch.set_num_threads(1)
    cfg = load_config(REPO / "eval_configs" / "demo_cpu.yaml", ["model.ckpt=null"])
    train_box_checkpoint(cfg, files["slice"], folder / "checkpoint_best")
    with serve(folder, [f"model.ckpt={folder / 'checkpoint_best'}"]) as (url, proc):
        yield {"url": url, "files": files, "log": folder / "server.log", "ckpt": folder / "checkpoint_best", "proc": proc}


def test_server_binds_localhost_only(server):
    log = server["log"].read_text()
    assert "127.0.0.1" in log and "0.0.0.0" not in log and "gradio.live" not in log
    assert "WARNING" not in log  # the checkpoint was found: no random-weights warning


def test_gradio_client_endpoints(server):
    from gradio_client import Client, handle_file

    client = Client(server["url"], verbose=False)
    api = client.view_api(print_info=False, return_format="dict")
    assert set(api["named_endpoints"]) == {"/ask", "/classify", "/scan_volume"}
    files = server["files"]

    text, image_path = client.predict(handle_file(str(files["slice"])), PANCREAS_Q, api_name="/ask")
    assert BOX_TEXT in text and f"Model answer: `{BOX_ANSWER}`" in text
    annotated = np.asarray(Image.open(image_path).convert("RGB"))
    original = np.asarray(Image.open(files["slice"]))
    assert annotated.shape == (128, 128, 3)
    red = (annotated[..., 0] == 255) & (annotated[..., 1] == 0) & (annotated[..., 2] == 0)
    # a 2-px outline inside the continuous box (51.2, 64.0, 76.8, 89.6): columns 51-52 and 75-76
    # (PIL truncates the corners), rows 64-65 and 88-89
    assert red[64:90, 51].all() and red[64:90, 76].all() and red[64, 51:77].all() and red[89, 51:77].all()
    assert not red[70:84, 53:75].any() and not red[:63].any()
    # everything else is the uploaded slice
    assert np.array_equal(annotated[..., 1][~red], original[~red])

    text, probability = client.predict(handle_file(str(files["slice"])), api_name="/classify")
    assert 0.0 <= probability <= 1.0 and f"P(yes) = {probability:.3f}" in text

    summary, rows, best_path = client.predict(handle_file(str(files["volume"])), "window", api_name="/scan_volume")
    assert summary.startswith("phantom.nii.gz: 5 slices scanned; most suspicious slice ")
    assert [row["slice"] for row in rows] == [0, 1, 2, 3, 4]
    best = max(rows, key=lambda r: (r["p_tumor"], -r["slice"]))["slice"]
    assert f"most suspicious slice {best} " in summary
    assert Image.open(best_path).size == (64, 64)


def test_bad_uploads_get_messages_and_the_server_survives(server):
    from gradio_client import Client, handle_file

    client = Client(server["url"], verbose=False)
    files = server["files"]
    text, image = client.predict(handle_file(str(files["text"])), PANCREAS_Q, api_name="/ask")
    assert text.startswith("⚠️ notes.txt: unsupported file type") and image is None
    text, image = client.predict(handle_file(str(files["colour"])), PANCREAS_Q, api_name="/ask")
    assert "holiday.png: this looks like a colour picture, not a CT slice" in text and image is None
    text, image = client.predict(handle_file(str(files["slice"])), "   ", api_name="/ask")
    assert "Type a question" in text
    summary, rows, image = client.predict(handle_file(str(files["slice"])), "paper", api_name="/scan_volume")
    assert "this is a slice image, not a volume" in summary and rows == [] and image is None
    text, _ = client.predict(handle_file(str(files["slice"])), PANCREAS_Q, api_name="/ask")
    assert "Model answer" in text  # still serving


@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.exists(), reason="headless browser test needs Debian's chromium at /usr/bin/chromium")
def test_browser_upload_and_locate_the_pancreas(server):
    files = server["files"]
    with browser_page(server["url"]) as page:
        notice = page.locator("#research-notice")
        notice.wait_for(timeout=30_000)
        assert "not a medical device" in notice.inner_text()
        assert "checkpoint_best" in page.locator("#model-description").inner_text()
        assert page.locator("#model-warning").count() == 0

        # a bad upload first: a message in the chat, no crash
        page.locator("#upload input[type=file]").set_input_files(str(files["colour"]))
        page.get_by_text("this looks like a colour picture").wait_for(timeout=30_000)

        page.locator("#upload button[aria-label='Clear']").first.click()
        page.locator("#upload input[type=file]").set_input_files(str(files["slice"]))
        page.get_by_text("Loaded slice phantom_slice.png").wait_for(timeout=30_000)
        page.locator("#viewer img").wait_for(timeout=30_000)
        page.locator("#quick-pancreas").click()
        page.locator("#chat").get_by_text(PANCREAS_Q).wait_for(timeout=30_000)
        page.locator("#chat").get_by_text("[51, 64, 77, 90]").wait_for(timeout=30_000)
        viewer = page.locator("#viewer img")
        assert viewer.count() == 1
        # the viewer shows the slice zoomed ×3 (384 px) with the red box
        page.wait_for_function(
            "() => { const img = document.querySelector('#viewer img');"
            " return img && img.complete && img.naturalWidth === 384; }",
            timeout=30_000,
        )
        import io

        shown = np.asarray(Image.open(io.BytesIO(viewer.screenshot())).convert("RGB")).astype(int)
        reddish = (shown[..., 0] > 200) & (shown[..., 1] < 60) & (shown[..., 2] < 60)
        assert reddish.sum() > 100, "no red box visible in the viewer"
        page.screenshot(path=str(ARTIFACTS / "demo_e2e.png"), full_page=True)

        # a whole volume: slider, scan with the P(tumor) plot and the per-slice table
        page.locator("#reset").click()
        page.locator("#upload input[type=file]").set_input_files(str(files["volume"]))
        page.get_by_text("Loaded volume phantom.nii.gz: 5 axial slices of 64×64").wait_for(timeout=30_000)
        page.locator("#slice-slider").wait_for(state="visible", timeout=30_000)
        page.locator("#scan-volume").click()
        page.get_by_text("Scanned 5 slices. Most suspicious: slice").wait_for(timeout=60_000)
        wait_for_scan_table(page, r"pancreas crop|whole slice", 5)
        # moving the slider shows another slice (the scan has jumped to the most suspicious one:
        # pick a slice that is not that one)
        before = viewer.get_attribute("src")
        number = page.locator("#slice-slider input[type=number]")
        shown_index = int(float(number.input_value()))
        number.fill("1" if shown_index != 1 else "3")
        number.press("Enter")
        page.wait_for_function(
            "(old) => { const img = document.querySelector('#viewer img'); return img && img.src !== old && img.complete; }",
            arg=before, timeout=30_000,
        )
        page.screenshot(path=str(ARTIFACTS / "demo_e2e_scan.png"), full_page=True)
    assert (ARTIFACTS / "demo_e2e.png").stat().st_size > 10_000


def test_shutdown_removes_the_private_temp_folder(server):
    """Runs last: uploads went into the private folder, and SIGTERM removes it."""
    match = re.search(r"private temp folder \(uploads, outputs; removed at exit\): (\S+)", server["log"].read_text())
    assert match, server["log"].read_text()[-2000:]
    workdir = Path(match.group(1))
    assert workdir.is_dir() and oct(workdir.stat().st_mode & 0o777) == "0o700"
    uploaded = [p.name for p in (workdir / "gradio").rglob("*") if p.is_file()]
    assert "phantom_slice.png" in uploaded  # Gradio's uploads are inside it, not in /tmp/gradio
    server["proc"].terminate()
    assert server["proc"].wait(timeout=20) == 0
    assert not workdir.exists()


@pytest.fixture(scope="module")
def cascade_server():
    """``python demo.py --cfg-path eval_configs/demo_cpu.yaml`` in three-stage mode: stage 1 is the
    box-trained checkpoint, stages 2 and 3 random tiny checkpoints of the same base."""
    import torch

    from minigpt4.config import load_config
    from tests.tiny import random_checkpoints

    folder = Path(tempfile.mkdtemp(prefix="demo_e2e_cascade_"))
    files = phantom_files(folder)
    torch.set_num_threads(1)
    cfg = load_config(REPO / "eval_configs" / "demo_cpu.yaml")
    assert cfg.model.ckpt is None and cfg.cascade.stages.configured()  # the documented three-stage mode
    stages = {"pancreas_detection": str(train_box_checkpoint(cfg, files["slice"], folder / "stage1"))}
    stages.update(random_checkpoints(folder, cfg.model, ["tumor_classification", "tumor_detection"]))
    from tests.test_demo_messages import EXPLICIT_OPERATING_POINT

    with serve(folder, [f"cascade.stages.{s}={p}" for s, p in stages.items()] + EXPLICIT_OPERATING_POINT) as (url, proc):
        yield {"url": url, "files": files}


@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.exists(), reason="headless browser test needs Debian's chromium at /usr/bin/chromium")
def test_browser_three_stage_demo_scans_a_volume(cascade_server):
    """Scan volume runs the cascade on a phantom NIfTI: per-slice table, P(tumor) plot, patient
    answer; the task buttons say which stage answered."""
    with browser_page(cascade_server["url"]) as page:
        description = page.locator("#model-description")
        description.wait_for(timeout=30_000)
        assert "three stages on one base" in description.inner_text()
        page.locator("#upload input[type=file]").set_input_files(str(cascade_server["files"]["volume"]))
        page.get_by_text("Loaded volume phantom.nii.gz: 5 axial slices of 64×64").wait_for(timeout=30_000)
        page.locator("#quick-tumor_yes_no").click()
        page.locator("#chat").get_by_text("Answered by stage 2 (tumor classification)").wait_for(timeout=30_000)
        page.locator("#quick-pancreas").click()
        page.locator("#chat").get_by_text("Answered by stage 1 (pancreas detection)").wait_for(timeout=30_000)
        page.locator("#scan-volume").click()
        page.get_by_text("Patient-level answer:").wait_for(timeout=60_000)
        wait_for_scan_table(page, r"pancreas crop|no pancreas box", 5)
        # the likelihood (never a percentage without a map) in the scan's message, and the page among
        # the downloads (NIfTI: no sr.dcm)
        page.locator("#chat").get_by_text("Among the scan files below:", exact=False).wait_for(timeout=30_000)
        chat = page.locator("#chat").inner_text()
        # no calibration map is served: never a "calibrated likelihood" percentage (an inconclusive scan has no score)
        assert "Patient-level answer:" in chat and "calibrated likelihood" not in chat
        assert "uncalibrated score" in chat or "inconclusive" in chat
        page.locator("#scan-files").get_by_text("report.html").wait_for(timeout=30_000)
        assert "sr.dcm" not in page.locator("#scan-files").inner_text().replace("seg.dcm and sr.dcm", "")
        page.screenshot(path=str(ARTIFACTS / "demo_e2e_cascade.png"), full_page=True)
    assert (ARTIFACTS / "demo_e2e_cascade.png").stat().st_size > 10_000
