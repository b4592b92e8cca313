"""The Gradio 6 interface of the clinician's demo (paper §3.9, appendix Fig. 1).

Layout: a research-prototype notice; on the left the upload (a CT slice, a NIfTI volume or a
zipped DICOM series), the normalisation choice, a slice slider and the viewer where answers are
drawn; on the right the chat with the task buttons; below, the volume scan (plot of P(tumor) per
slice and a table of boxes).

Every handler turns bad input and model failures into a chat message (:class:`InputError`
messages verbatim, anything else as "the model could not process ..." with the traceback logged
server-side; a guard around every handler catches what its own checks miss), so the app never
crashes on an upload and no traceback reaches the user. Every text a handler shows passes through
:func:`minigpt4.inference.readers.public_message`, which strips the server's private paths (the
upload's temp path, the private workdir, Gradio's temp dir, the temp dir, caches, the home
folder). Scripted endpoints (``gradio_client``) are stateless: ``/ask``, ``/classify``,
``/scan_volume``. The UI's own events are ``api_visibility="private"``: hidden from the API page
and refused by ``gradio_client``, but reachable over HTTP by their ``fn_index`` as the browser
calls them, so they check their input like the public endpoints. See docs/DEMO.md.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import gradio as gr
import numpy as np

from minigpt4.demo.service import QUICK_TASKS, DemoService, ScanResult, make_private_workdir
from minigpt4.drawing import annotate, display_scale
from minigpt4.inference.readers import NORMALISATIONS, InputError, load_slice, load_volume, public_message, upload_kind
from minigpt4.inference.pipeline import VolumeResult
from minigpt4.inference.inputs import volume_name
from minigpt4.scan_outputs import checkpoint_identities, fingerprint, write_volume_outputs

logger = logging.getLogger(__name__)

TITLE = "MiniGPT-Pancreas — CT chat (research prototype)"
NOTICE = (
    "<div id='research-notice' style='border:2px solid #b45309;background:#fef3c7;color:#78350f;"
    "padding:10px 14px;border-radius:8px;font-size:15px'>"
    "<b>Research prototype — not a medical device.</b> Answers are produced by a machine-learning "
    "model and can be wrong; they must not be used for diagnosis or treatment decisions. "
    "Do not upload identifiable patient data to a machine you do not control.</div>"
)
UPLOAD_TYPES = [".png", ".jpg", ".jpeg", ".nii", ".gz", ".zip"]
SCAN_HEADERS = ["slice", "P(tumor)", "classified on", "pancreas box (px)", "tumor box (px)"]


def _warning_html(text: str) -> str:
    return (
        "<div id='model-warning' style='border:2px solid #b91c1c;background:#fee2e2;color:#7f1d1d;"
        f"padding:8px 14px;border-radius:8px'><b>Warning:</b> {text}</div>"
    )


def _empty_state() -> dict:
    return {"name": None, "kind": None, "slices": None, "index": 0, "boxes": {}, "scan": None}


def _error_text(err: BaseException) -> str:
    """The user's text for a failed request (before :func:`public_message`): an :class:`InputError`
    as is; anything else generic, with its type and the first line of its message (the traceback
    goes to the server's log only)."""
    if isinstance(err, InputError):
        return f"⚠️ {err}"
    logger.error("demo: model or reader failure", exc_info=err)
    lines = str(err).strip().splitlines()
    detail = type(err).__name__ + (f": {lines[0][:200]}" if lines else "")
    return (f"⚠️ The model could not process this request ({detail}). "
            "The app is still running: try another image or question.")


def _guarded(fallback):
    """Wrap a handler so nothing it raises reaches Gradio (whose error toast would show the raw
    exception): the failure becomes ``fallback(handlers, message, *args)``, the handler's outputs
    with the (path-free) message, and is logged with its traceback."""

    def wrap(method):
        @functools.wraps(method)  # keeps the signature: Gradio finds the gr.Progress parameter
        def guarded(self, *args, **kwargs):
            try:
                return method(self, *args, **kwargs)
            except Exception as err:  # noqa: BLE001 - the app must keep serving
                return fallback(self, self.error_text(err), *args)

        return guarded

    return wrap


def _chat(history, message: str) -> list:
    return [*(history or []), {"role": "assistant", "content": message}]


def _current(state: dict) -> Optional[np.ndarray]:
    if not state or state.get("slices") is None:
        return None
    return state["slices"][state["index"]]


def _render(state: dict):
    image = _current(state)
    if image is None:
        return None
    # small slices (phantoms, crops) are zoomed in the viewer only; boxes stay in slice pixels
    return annotate(image, state["boxes"].get(state["index"], []), scale=display_scale(*image.shape[:2]))


def _scan_plot(result: ScanResult, current: Optional[int] = None):
    """Matplotlib figure: P(tumor) per slice, the most suspicious slice marked."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(7, 2.6), dpi=100)
    ax = fig.add_subplot()
    index = [r.slice_index for r in result.rows]
    # nan (no pancreas box, three-stage mode) leaves a gap in the line
    ax.plot(index, [np.nan if r.p_tumor is None else r.p_tumor for r in result.rows], ".-", color="#b91c1c", lw=1.5,
            ms=4, label="P(tumor)")
    if result.patient is not None:
        ax.axhline(result.patient.threshold, color="#6b7280", ls=":", lw=1, label="threshold")
    with_box = [r.slice_index for r in result.rows if r.tumor_box is not None and r.p_tumor is not None]
    if with_box:
        ax.scatter(with_box, [result.rows[i].p_tumor for i in with_box], s=12, color="black", zorder=3,
                   label="tumor box answered")
    best = result.most_suspicious
    if result.rows[best].p_tumor is not None:  # nothing classified: no slice is most suspicious
        ax.axvline(best, color="#2563eb", ls="--", lw=1, label=f"most suspicious: slice {best}")
    ax.set_ylim(0, 1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("slice")
    ax.set_ylabel("P(tumor)")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return fig


def scan_files_text(report: dict, names: list[str]) -> str:
    """The chat message that goes with the scan's files: what the page and the SR are, and an SR
    that could not be written. The likelihood and the fitness checks are already in the scan's
    own message (:meth:`ScanResult.chat_text`), so they are not said twice."""
    lines = []
    offered = [f"`{name}` ({what})" for name, what in (("report.html", "a page to read"),
                                                         ("sr.dcm", "a DICOM structured report for a PACS"))
               if name in names]
    if offered:
        lines.append(f"Among the scan files below: {' and '.join(offered)}.")
    structured = report.get("structured_report") or {}
    if structured.get("error"):
        lines.append(f"⚠️ sr.dcm could not be written: {structured['error']}")
    return "\n\n".join(lines)


def _scan_table(result: ScanResult) -> list[list]:
    def fmt(box):
        return "" if box is None else "[" + ", ".join(str(round(v)) for v in box) + "]"

    return [[r.slice_index, "" if r.p_tumor is None else round(r.p_tumor, 3), r.classified_on, fmt(r.pancreas_box),
             fmt(r.tumor_box)] for r in result.rows]


class DemoHandlers:
    """The app's event handlers, plain methods so tests can call them without a server.

    UI events take and return the session ``state`` dict and the chat history (Gradio
    "messages": ``{"role", "content"}`` dicts); scripted endpoints are stateless.
    """

    def __init__(self, service: DemoService, workdir: Path) -> None:
        self.service = service
        self.workdir = Path(workdir)
        self.limits = service.limits
        self._checkpoints: Optional[list] = None  # the served checkpoints' identities, hashed at the first scan

    # -- the one way out for text --------------------------------------------------------------
    def public(self, text: str, upload=None) -> str:
        """``text`` as the user may see it: without private paths (:func:`public_message`)."""
        return public_message(text, upload, [self.workdir, self.workdir / "gradio"])

    def error_text(self, err: BaseException, upload=None) -> str:
        return self.public(_error_text(err), upload)

    # -- UI events (stateful) ------------------------------------------------------------------
    @_guarded(lambda self, message, path=None, normalisation=None, history=None, *rest: (
        _empty_state(), None, gr.update(visible=False, value=0, maximum=1), _chat(history, message), None, None))
    def on_upload(self, path, normalisation, history, state):
        history = list(history or [])
        state = _empty_state()
        hidden_slider = gr.update(visible=False, value=0, maximum=1)
        if path is None:
            return state, None, hidden_slider, history, None, None
        name = Path(path).name
        try:
            if upload_kind(path) == "slice":
                slices = load_slice(path, self.limits)[None]
                kind = "slice"
            else:
                volume = load_volume(path, normalisation, self.limits, self.workdir)
                slices, kind = volume.slices, "volume"
        except Exception as err:  # noqa: BLE001 - every failure becomes a chat message
            history.append({"role": "assistant", "content": self.error_text(err, path)})
            return state, None, hidden_slider, history, None, None
        count, height, width = slices.shape
        state.update(name=name, kind=kind, slices=slices, index=count // 2, path=str(path), normalisation=normalisation)
        if kind == "volume":  # the scan's files are written in the upload's own geometry
            state.update(geometry=volume.geometry, dicom_headers=volume.dicom_headers, acquisition=volume.acquisition)
        if kind == "slice":
            text = f"Loaded slice **{name}** ({width}×{height}). Ask a question or press a task button."
            slider = hidden_slider
        else:
            text = (
                f"Loaded volume **{name}**: {count} axial slices of {width}×{height}, normalisation "
                f"`{normalisation}`, radiological orientation (anterior up, patient's right on the left). "
                f"Showing slice {count // 2}; questions are about the displayed slice. "
                "**Scan volume** checks every slice."
            )
            slider = gr.update(visible=True, minimum=0, maximum=count - 1, step=1, value=count // 2)
        history.append({"role": "assistant", "content": self.public(text, path)})
        return state, _render(state), slider, history, None, None

    @_guarded(lambda self, message, index=None, state=None, *rest: (state, gr.update()))
    def on_slider(self, index, state):
        if not state or state.get("slices") is None:
            return state, None
        count = state["slices"].shape[0]
        state["index"] = int(min(max(int(index or 0), 0), count - 1))
        return state, _render(state)

    @_guarded(lambda self, message, instruction=None, history=None, *rest: (_chat(history, message), gr.update(),
                                                                          instruction or ""))
    def on_ask(self, instruction, history, state):
        history = list(history or [])
        image = _current(state)
        instruction = (instruction or "").strip()
        if instruction:
            where = f" (slice {state['index']})" if state and state.get("kind") == "volume" else ""
            history.append({"role": "user", "content": instruction + where})
        if image is None:
            history.append({"role": "assistant", "content": self.public("⚠️ Upload a CT slice or volume first.")})
            return history, None, ""
        try:
            answer = self.service.ask(image, instruction)
        except Exception as err:  # noqa: BLE001
            history.append({"role": "assistant", "content": self.error_text(err, state.get("path"))})
            return history, _render(state), instruction
        if answer.task == "detection":
            # keep the scan's boxes off this slice: the red box is the answer just given
            box = self.service.answer_boxes(answer)
            state["boxes"][state["index"]] = box
        history.append({"role": "assistant", "content": self.public(answer.message, state.get("path"))})
        return history, _render(state), ""

    @_guarded(lambda self, message, history=None, state=None, *rest: (
        state, gr.update(), gr.update(), None, None, _chat(history, message), None))
    def on_scan(self, history, state, progress=gr.Progress()):
        history = list(history or [])
        if not state or state.get("kind") != "volume":
            message = "⚠️ Scan needs a CT volume (.nii, .nii.gz or a DICOM .zip)."
            history.append({"role": "assistant", "content": self.public(message)})
            return state, _render(state), gr.update(), None, None, history, None
        try:
            result = self.service.scan_volume(state["slices"], progress=lambda f, d: progress(f, desc=d),
                                              acquisition=state.get("acquisition"), dicom_headers=state.get("dicom_headers"))
        except Exception as err:  # noqa: BLE001
            history.append({"role": "assistant", "content": self.error_text(err, state.get("path"))})
            return state, _render(state), gr.update(), None, None, history, None
        state["scan"] = result
        state["boxes"] = {r.slice_index: result.boxes_for(r.slice_index) for r in result.rows}
        best = result.most_suspicious
        state["index"] = best
        text, failure = result.chat_text(), None
        try:
            files = self.scan_files(state, result)
            if files:  # the page and the SR among the downloads (and an SR that failed)
                report = json.loads(Path(files[0]).read_text(encoding="utf-8"))
                extra = scan_files_text(report, [Path(f).name for f in files])
                text += "\n\n" + extra if extra else ""
        except Exception as err:  # noqa: BLE001 - the scan on screen stays; only the files failed
            files, failure = None, err
        history.append({"role": "assistant", "content": self.public(text, state.get("path"))})
        if failure is not None:
            history.append({"role": "assistant", "content": self.error_text(failure, state.get("path"))})
        return state, _render(state), gr.update(value=best), _scan_plot(result), _scan_table(result), history, files

    def scan_files(self, state: dict, result: ScanResult) -> Optional[list[str]]:
        """The scan's ``report.json`` (first), ``boxes.nii.gz``, ``montage.png``, ``report.html`` (and
        ``seg.dcm`` with a box, ``sr.dcm``, for a DICOM upload), written as ``scan.py`` writes them
        (:func:`minigpt4.scan_outputs.write_volume_outputs`) into a fresh folder of the private
        workdir; None without the upload's geometry."""
        import tempfile

        if state.get("geometry") is None:
            return None
        if self._checkpoints is None:  # a user sees the checkpoints' names and hashes, never server paths
            self._checkpoints = [dataclasses.replace(c, path=Path(c.path).name)
                                 for c in checkpoint_identities(self.service.checkpoints)]
        name = volume_name(Path(state["name"]).name)  # `...nii.gz` → `volume`: never `..`
        folder = Path(tempfile.mkdtemp(prefix="scan_", dir=self.workdir)) / name
        checkpoints = self._checkpoints
        settings = {"normalisation": state.get("normalisation"), **dataclasses.asdict(self.service.cascade)}
        written = write_volume_outputs(
            folder, volume=name, source=state["name"], geometry=state["geometry"],
            result=VolumeResult(result.rows, result.patient), checkpoints=checkpoints,
            fingerprint=fingerprint([state["path"]], checkpoints, settings), dicom_headers=state.get("dicom_headers"),
            extra={"config": settings}, fitness=result.fitness, calibration=self.service.calibration,
            slice_calibration=self.service.slice_calibration, slices=state["slices"])
        return [str(folder / file) for file in written]

    @staticmethod
    def on_reset():
        return _empty_state(), None, gr.update(visible=False, value=0, maximum=1), [], None, None, None, "", None

    # -- scripted endpoints (stateless) -----------------------------------------------------------
    @_guarded(lambda self, message, *args: (message, None))
    def api_ask(self, path, instruction):
        """(slice file, instruction) → (answer text, annotated slice or None)."""
        try:
            if path is None:
                raise InputError("no image file given.")
            image = load_slice(path, self.limits)
            answer = self.service.ask(image, instruction)
        except Exception as err:  # noqa: BLE001
            return self.error_text(err, path), None
        return self.public(answer.message, path), self.service.annotated(image, answer)

    @_guarded(lambda self, message, *args: (message, None))
    def api_classify(self, path):
        """(slice file) → (answer text, P(yes) or None)."""
        try:
            if path is None:
                raise InputError("no image file given.")
            answer = self.service.classify(load_slice(path, self.limits))
        except Exception as err:  # noqa: BLE001
            return self.error_text(err, path), None
        return self.public(answer.message, path), answer.p_yes

    @_guarded(lambda self, message, *args: (message, [], None))
    def api_scan(self, path, normalisation, progress=gr.Progress()):
        """(volume file, normalisation) → (summary, per-slice rows, annotated most suspicious slice)."""
        try:
            if path is None:
                raise InputError("no volume file given.")
            volume = load_volume(path, normalisation or self.service.normalization, self.limits, self.workdir)
            result = self.service.scan_volume(volume.slices, progress=lambda f, d: progress(f, desc=d),
                                              acquisition=volume.acquisition, dicom_headers=volume.dicom_headers)
        except Exception as err:  # noqa: BLE001
            return self.error_text(err, path), [], None
        best = result.most_suspicious
        summary = self.public(result.summary_text(volume.name), path)
        return summary, [r.as_dict() for r in result.rows], annotate(volume.slices[best], result.boxes_for(best))


def build_app(service: DemoService, workdir: Optional[str | os.PathLike] = None) -> gr.Blocks:
    """Construct the interface (nothing is launched).

    Args:
        service: the model wrapper (:class:`minigpt4.demo.service.DemoService`).
        workdir: private temp folder for uploads, Gradio's cache and extracted DICOM files; a
            fresh ``tempfile.mkdtemp`` folder (mode 0700, removed at exit) when None.

    Returns:
        The ``gr.Blocks`` app; launch it with :func:`launch`.
    """
    workdir = Path(workdir) if workdir is not None else private_workdir()
    # Gradio keeps uploads and outputs in GRADIO_TEMP_DIR (default: a shared /tmp/gradio with
    # content-hash names); point it into our private folder before any component is created.
    os.environ["GRADIO_TEMP_DIR"] = str(workdir / "gradio")
    h = DemoHandlers(service, workdir)

    # ---------------------------------------------------------------- layout
    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=(600, 3600)) as app:
        state = gr.State(_empty_state())
        gr.Markdown(f"# {TITLE}")
        gr.HTML(NOTICE)
        if service.warning:
            gr.HTML(_warning_html(h.public(service.warning)))
        if service.description:
            gr.Markdown(h.public(f"Serving: {service.description}"), elem_id="model-description")
        with gr.Row():
            with gr.Column(scale=5):
                upload = gr.File(
                    label="CT slice (PNG/JPEG) or volume (.nii, .nii.gz, zipped DICOM series)",
                    file_types=UPLOAD_TYPES,
                    type="filepath",
                    elem_id="upload",
                )
                normalisation = gr.Radio(
                    list(NORMALISATIONS), value=service.normalization, label="Volume normalisation",
                    info="paper: 2–98 % clip + histogram equalisation; window: HU [-150, 250]",
                )
                slider = gr.Slider(0, 1, value=0, step=1, label="Slice", visible=False, elem_id="slice-slider")
                viewer = gr.Image(label="Displayed slice (answers drawn in red)", type="pil", format="png",
                                  interactive=False, elem_id="viewer", height=420)
                scan_button = gr.Button("Scan volume", elem_id="scan-volume")
            with gr.Column(scale=6):
                chatbot = gr.Chatbot(label="Chat", height=420, elem_id="chat")
                with gr.Row():
                    instruction = gr.Textbox(
                        placeholder="Type an instruction, e.g. [refer] Where is the pancreas?  or  [vqa] Is there a tumor?",
                        show_label=False, scale=5, elem_id="instruction", max_length=service.limits.max_instruction_chars,
                    )
                    send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
                with gr.Row():
                    quick = {key: gr.Button(label, size="sm", elem_id=f"quick-{key}") for key, (label, _) in QUICK_TASKS.items()}
                reset = gr.Button("Reset", variant="stop", size="sm", elem_id="reset")
                gr.Markdown(
                    "Detection instructions start with `[refer]` (the answer is a box), questions with "
                    "`[vqa]`. Each question is answered on its own about the displayed slice."
                )
        with gr.Row():
            scan_plot = gr.Plot(label="P(tumor) per slice", elem_id="scan-plot")
            scan_table = gr.Dataframe(headers=SCAN_HEADERS, label="Per-slice results", interactive=False, elem_id="scan-table",
                                      max_height=300)
        scan_files = gr.File(label="Scan files: report.html (a page to read), report.json, boxes.nii.gz (opens over the "
                                   "CT in 3D Slicer / ITK-SNAP), montage.png; for DICOM uploads seg.dcm and sr.dcm "
                                   "(DICOM structured report)", file_count="multiple", interactive=False,
                             elem_id="scan-files")

        private: dict = {"api_visibility": "private"}
        upload_outputs = [state, viewer, slider, chatbot, scan_plot, scan_table]
        upload.change(h.on_upload, [upload, normalisation, chatbot, state], upload_outputs, **private)
        upload.change(lambda: None, None, scan_files, **private)  # a new upload: the old scan's files go
        normalisation.change(h.on_upload, [upload, normalisation, chatbot, state], upload_outputs, **private)
        # user moves only (.input): programmatic updates (upload, scan) already render the slice
        slider.input(h.on_slider, [slider, state], [state, viewer], trigger_mode="always_last", **private)
        ask_outputs = [chatbot, viewer, instruction]
        send.click(h.on_ask, [instruction, chatbot, state], ask_outputs, **private)
        instruction.submit(h.on_ask, [instruction, chatbot, state], ask_outputs, **private)
        for key, button in quick.items():
            fixed = gr.State(QUICK_TASKS[key][1])
            button.click(h.on_ask, [fixed, chatbot, state], ask_outputs, **private)
        scan_button.click(h.on_scan, [chatbot, state], [state, viewer, slider, scan_plot, scan_table, chatbot, scan_files],
                          **private)
        reset.click(h.on_reset, None, [state, viewer, slider, chatbot, scan_plot, scan_table, upload, instruction, scan_files],
                    **private)

        # Scripted endpoints: hidden components, so clients see typed inputs/outputs.
        with gr.Group(visible=False):
            api_file = gr.File(label="image or volume file", type="filepath")
            api_text = gr.Textbox(label="instruction")
            api_norm = gr.Radio(list(NORMALISATIONS), value=service.normalization, label="normalisation")
            api_answer = gr.Textbox(label="answer")
            api_image = gr.Image(label="annotated slice", type="pil", format="png")
            api_prob = gr.Number(label="P(yes)")
            api_rows = gr.JSON(label="per-slice results")
            api_go = gr.Button("api")
        api_go.click(h.api_ask, [api_file, api_text], [api_answer, api_image], api_name="ask")
        api_go.click(h.api_classify, [api_file], [api_answer, api_prob], api_name="classify")
        api_go.click(h.api_scan, [api_file, api_norm], [api_answer, api_rows, api_image], api_name="scan_volume")
    app.queue(default_concurrency_limit=1)
    return app


def private_workdir() -> Path:
    """A fresh private temp folder (``tempfile.mkdtemp``: random name, mode 0700) that is removed
    when the process exits (``demo.main`` turns SIGTERM into a normal exit so this runs)."""
    workdir = make_private_workdir()
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)
    return workdir


def parse_size(text: str) -> int:
    """``'200mb'`` / ``'1gb'`` / ``'500kb'`` / ``'1024'`` → bytes."""
    value = str(text).strip().lower()
    for suffix, factor in (("gb", 1024**3), ("mb", 1024**2), ("kb", 1024), ("b", 1)):
        if value.endswith(suffix):
            number = value[: -len(suffix)].strip()
            break
    else:
        number, factor = value, 1
    try:
        size = int(float(number) * factor)
    except ValueError:
        raise ValueError(f"cannot read the size {text!r}; use e.g. 200mb or 1gb") from None
    if size <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return size


def launch(
    app: gr.Blocks,
    host: str = "127.0.0.1",
    port: Optional[int] = None,
    share: bool = False,
    max_file_size: str | int = "1gb",
    block: bool = True,
    quiet: bool = False,
) -> Any:
    """Serve the app. Binds to ``host`` (localhost by default); a public link only with ``share``.

    Returns what ``Blocks.launch`` returns (app, local URL, share URL) when ``block`` is False.
    """
    return app.launch(
        server_name=host,
        server_port=port,
        share=bool(share),
        max_file_size=max_file_size,
        prevent_thread_lock=not block,
        show_error=True,
        quiet=quiet,
        footer_links=["api"],
        enable_monitoring=False,
        mcp_server=False,
        ssr_mode=False,
        pwa=False,
    )
