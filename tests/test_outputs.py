"""Issue 19 items 3 and 4: one rule for output folders (minigpt4/outputs.py), OS errors at the
edge, picklable errors and pools that fail instead of hanging; the export / training / feature
cache hostile cases."""

from __future__ import annotations

import errno
import importlib
import inspect
import json
import os
import pickle
import pkgutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import minigpt4
import preprocessing
from minigpt4.cli import run_main
from minigpt4.commands.export import main as export_main
from minigpt4.models.checkpoints import load_weights, save_checkpoint
from minigpt4.models.minigpt_v2 import build_model
from minigpt4.outputs import FolderBusyError, OutputFolder, OutputFolderError
from preprocessing.jobs import WorkerDied, run_jobs
from preprocessing.volumes import VolumeError
from tests.test_checkpoints import release_state, save_release_pth
from tests.tiny import tiny_model_config

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- picklable errors
def _project_exception_classes() -> list[type]:
    found = {}
    for package in (minigpt4, preprocessing):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if info.name.endswith("__main__"):
                continue
            try:
                module = importlib.import_module(info.name)
            except ImportError:  # an optional extra (gradio) that is not installed
                continue
            for _, obj in inspect.getmembers(module, inspect.isclass):
                if issubclass(obj, BaseException) and obj.__module__.split(".")[0] in ("minigpt4", "preprocessing"):
                    found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return [found[k] for k in sorted(found)]


def test_every_project_exception_survives_pickle():
    classes = _project_exception_classes()
    names = {c.__name__ for c in classes}
    assert {"VolumeError", "PreparationError", "ConfigError", "LeakageError", "OutputFolderError",
            "FolderBusyError"} <= names
    for cls in classes:
        required = [p for p in list(inspect.signature(cls.__init__).parameters.values())[1:]
                    if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        args = [f"{cls.__name__}-{p.name}" for p in required] or [f"{cls.__name__} message"]
        err = cls(*args)
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is cls and str(back) == str(err), cls
        assert back.__dict__ == err.__dict__, cls
    back = pickle.loads(pickle.dumps(VolumeError("/x/a.nii.gz", "expected a 3-D volume")))
    assert (back.path, back.problem) == ("/x/a.nii.gz", "expected a 3-D volume")


def _raise_volume_error(job):
    raise VolumeError(f"/data/{job}.nii.gz", "expected a 3-D volume, got shape (64, 64, 10, 3)")


def _die(job):
    if job == "b":
        os._exit(3)
    return job


def test_pool_passes_worker_errors_and_fails_when_a_worker_dies():
    start = time.perf_counter()
    with pytest.raises(VolumeError, match="expected a 3-D volume") as caught:
        run_jobs(["a", "b", "c"], _raise_volume_error, workers=2)
    assert caught.value.problem.startswith("expected a 3-D volume")
    with pytest.raises(WorkerDied, match="a worker process died .* at b"):
        run_jobs(["a", "b", "c"], _die, workers=2)
    assert time.perf_counter() - start < 60  # it used to hang forever


# ----------------------------------------------------------------------------- the folder rule
def test_output_folder_rules_lock_and_cleanup(tmp_path):
    # a new folder: created, manifest marks it; a failure removes it entirely
    out = tmp_path / "new" / "deep"
    with pytest.raises(RuntimeError):
        with OutputFolder(out, "demo") as folder:
            (folder.path / "x.txt").write_text("partial")
            raise RuntimeError("boom")
    assert not (tmp_path / "new").exists()
    with OutputFolder(out, "demo") as folder:
        folder.write_manifest({"status": "complete"})
    assert sorted(os.listdir(out)) == ["manifest.json"]  # no lock files left behind
    # someone else's manifest, a non-empty foreign folder, a file, under a file
    with pytest.raises(OutputFolderError, match="not a manifest written by other"):
        OutputFolder(out, "other").__enter__()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(OutputFolderError, match="not empty and has no manifest.json"):
        OutputFolder(mine, "demo").__enter__()
    with pytest.raises(RuntimeError):  # --overwrite: a failure removes only what the command created
        with OutputFolder(mine, "demo", overwrite=True) as folder:
            (mine / "new.txt").write_text("x")
            raise RuntimeError("boom")
    assert sorted(os.listdir(mine)) == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep"
    with OutputFolder(mine, "demo", overwrite=True) as folder:
        with pytest.raises(OutputFolderError, match=r"would replace 1 file\(s\) that demo did not write \(notes.txt\)"):
            folder.check_no_foreign(["notes.txt", "result.json"])
    with pytest.raises(OutputFolderError, match="exists and is not a folder"):
        OutputFolder(mine / "notes.txt", "demo").__enter__()
    with pytest.raises(OutputFolderError, match="which is a file"):
        OutputFolder(mine / "notes.txt" / "sub", "demo").__enter__()


def _hold_lock(folder: Path) -> subprocess.Popen:
    """A second process that holds ``folder``'s lock until killed; returns once it holds it."""
    code = ("import sys, time\nfrom minigpt4.outputs import OutputFolder\n"
            "with OutputFolder(sys.argv[1], 'train', overwrite=True):\n    print('held', flush=True)\n    time.sleep(120)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_writer_stops_at_once_naming_the_first(tmp_path):
    holder = _hold_lock(tmp_path / "run")
    try:
        start = time.perf_counter()
        with pytest.raises(FolderBusyError, match=f"PID {holder.pid} on host {socket.gethostname()}"):
            OutputFolder(tmp_path / "run", "train").__enter__()
        assert time.perf_counter() - start < 5
    finally:
        holder.kill()
        holder.wait()


def test_two_train_runs_into_one_output_dir(tmp_path, capsys):
    """The second train.py stops at once (before the model is built), naming the first."""
    import train as train_entry
    from tests.test_train import QUICKSTART, make_synthetic

    data = make_synthetic(tmp_path / "data", n=4)
    out = tmp_path / "run"
    holder = _hold_lock(out)
    capsys.readouterr()
    try:
        argv = ["--cfg-path", str(QUICKSTART), "--options", f"datasets.synthetic.root={data}",
                f"run.output_dir={out}", "run.max_steps=1"]
        assert run_main(train_entry.main, argv, prog="train.py") == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"train.py: error: {out}: another run is writing into this folder (PID {holder.pid}")
        assert len(err.splitlines()) == 1
        assert not (out / "log.jsonl").exists() and not (out / "config.yaml").exists()
    finally:
        holder.kill()
        holder.wait()


# ----------------------------------------------------------------------------- export
@pytest.fixture
def release_pth(tmp_path) -> Path:
    path = tmp_path / "release.pth"
    save_release_pth(path, release_state(("q_proj", "v_proj")))
    return path


def _export(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    status = export_main([str(a) for a in argv])
    return status, capsys.readouterr().err.strip()


def test_export_refuses_the_repository_root(tmp_path, release_pth, capsys, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "README.md").write_text("# the project\n")
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(["git", "-C", str(repo), "add", "README.md"], check=True)
    monkeypatch.chdir(repo)
    status, err = _export(capsys, "--ckpt", release_pth, "--out", ".")
    assert status == 2 and "holds 1 file(s) tracked by git (README.md)" in err and len(err.splitlines()) == 1
    assert (repo / "README.md").read_text() == "# the project\n"
    assert sorted(os.listdir(repo)) == [".git", "README.md"]
    # an untracked folder inside the work tree is fine
    assert _export(capsys, "--ckpt", release_pth, "--out", "output/peft")[0] == 0
    # this project's own root and packages, git or not (checked before anything is written)
    for folder in (ROOT, ROOT / "minigpt4", ROOT / "preprocessing" / "new"):
        with pytest.raises(OutputFolderError, match="the project's own source folder"):
            OutputFolder(folder, "export").__enter__()


def test_export_into_a_user_folder_replaces_nothing(tmp_path, release_pth, capsys):
    user = tmp_path / "user"
    user.mkdir()
    (user / "README.md").write_text("my notes")
    (user / "adapter_config.json").write_text("{\"mine\": 1}")
    status, err = _export(capsys, "--ckpt", release_pth, "--out", user)
    assert status == 2 and "folder is not empty and has no manifest.json" in err
    status, err = _export(capsys, "--ckpt", release_pth, "--out", user, "--overwrite")
    assert status == 2 and "would replace 2 file(s)" in err and "README.md" in err and "adapter_config.json" in err
    assert sorted(os.listdir(user)) == ["README.md", "adapter_config.json"]
    assert (user / "README.md").read_text() == "my notes"
    # its own folder: a second export replaces it
    assert _export(capsys, "--ckpt", release_pth, "--out", tmp_path / "peft")[0] == 0
    assert _export(capsys, "--ckpt", release_pth, "--out", tmp_path / "peft")[0] == 0
    manifest = json.loads((tmp_path / "peft" / "manifest.json").read_text())
    assert manifest["command"] == "export" and manifest["status"] == "complete"
    assert manifest["files"]["llama_proj.safetensors"] == (tmp_path / "peft" / "llama_proj.safetensors").stat().st_size


def test_a_partial_export_is_never_loadable(tmp_path, capsys, monkeypatch):
    cfg = tiny_model_config(**{"vision.trainable": True})
    save_checkpoint(build_model(cfg), tmp_path / "ckpt")
    import safetensors
    import safetensors.torch as export_module  # minigpt4.io.save_safetensors_atomic calls its save_file

    real_save = export_module.save_file

    def disk_full_at_the_vit(tensors, path, metadata=None):
        if any(k.startswith("visual_encoder.") for k in tensors):  # what the real writer raises on ENOSPC
            raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(export_module, "save_file", disk_full_at_the_vit)
    status, err = _export(capsys, "--ckpt", tmp_path / "ckpt", "--out", tmp_path / "new")
    assert status == 2 and err == (f"python -m minigpt4.export: error: {tmp_path / 'new' / 'visual_encoder.safetensors'}: "
                                   "no space left on the device: free some space or choose another output folder")
    assert not (tmp_path / "new").exists()  # what the failed export created is gone
    # into its own earlier export: the folder stays, marked incomplete, and does not load
    monkeypatch.setattr(export_module, "save_file", real_save)
    assert _export(capsys, "--ckpt", tmp_path / "ckpt", "--out", tmp_path / "peft")[0] == 0
    assert load_weights(build_model(cfg), tmp_path / "peft").loaded
    monkeypatch.setattr(export_module, "save_file", disk_full_at_the_vit)
    (tmp_path / "peft" / "visual_encoder.safetensors").unlink()  # as if the disk filled before it was renamed
    assert _export(capsys, "--ckpt", tmp_path / "ckpt", "--out", tmp_path / "peft")[0] == 2
    with pytest.raises(ValueError, match="an incomplete export"):
        load_weights(build_model(cfg), tmp_path / "peft")
    # a complete manifest whose file is gone or truncated
    monkeypatch.setattr(export_module, "save_file", real_save)
    assert _export(capsys, "--ckpt", tmp_path / "ckpt", "--out", tmp_path / "peft")[0] == 0
    vit = tmp_path / "peft" / "visual_encoder.safetensors"
    vit.write_bytes(vit.read_bytes()[:100])
    with pytest.raises(ValueError, match="visual_encoder.safetensors: 100 bytes, the export manifest says"):
        load_weights(build_model(cfg), tmp_path / "peft")
    vit.unlink()
    with pytest.raises(ValueError, match="visual_encoder.safetensors: missing from the export"):
        load_weights(build_model(cfg), tmp_path / "peft")


def test_export_lora_alpha_is_checked_and_never_overrides_a_recorded_one(tmp_path, release_pth, capsys):
    for bad in ("0", "nan", "-2", "inf"):
        status, err = _export(capsys, "--ckpt", release_pth, "--out", tmp_path / "x", "--lora-alpha", bad)
        assert status == 2 and "--lora-alpha must be a finite number > 0" in err, bad
    assert not (tmp_path / "x").exists()
    save_checkpoint(build_model(tiny_model_config()), tmp_path / "ckpt")  # records alpha 16
    status, err = _export(capsys, "--ckpt", tmp_path / "ckpt", "--out", tmp_path / "y", "--lora-alpha", "8")
    assert status == 2 and "records lora_alpha=16; --lora-alpha 8 would change it" in err
    assert _export(capsys, "--ckpt", tmp_path / "ckpt", "--out", tmp_path / "y", "--lora-alpha", "16")[0] == 0
    assert _export(capsys, "--ckpt", release_pth, "--out", tmp_path / "z", "--lora-alpha", "8")[0] == 0
    assert json.loads((tmp_path / "z" / "adapter_config.json").read_text())["lora_alpha"] == 8


def test_export_out_that_is_a_file_under_a_file_or_read_only(tmp_path, release_pth, capsys, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("data")
    status, err = _export(capsys, "--ckpt", release_pth, "--out", afile)
    assert status == 2 and err.endswith(f"{afile}: --out exists and is not a folder; choose a folder")
    status, err = _export(capsys, "--ckpt", release_pth, "--out", afile / "sub")
    assert status == 2 and "which is a file, not a folder" in err
    assert afile.read_text() == "data"
    readonly = tmp_path / "ro"
    real_mkdir = os.mkdir

    def read_only_mkdir(path, *args, **kwargs):
        if str(path).startswith(str(readonly)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", read_only_mkdir)
    status, err = _export(capsys, "--ckpt", release_pth, "--out", readonly / "peft")
    assert status == 2 and err == (f"python -m minigpt4.export: error: {readonly / 'peft'}: read-only file system: "
                                   "choose another output folder")


class Payload:
    """Any object torch's weights-only unpickler refuses."""


def test_a_foreign_pth_never_echoes_torch_advice(tmp_path, capsys):
    torch.save({"x": Payload()}, tmp_path / "foreign.pth")
    # random bytes: most fail in torch's unpickler, some (≈ 7 %) earlier with IndexError/KeyError/...;
    # every way must end in our one line (seeded, so a failure reproduces)
    rng = np.random.default_rng(0)
    for seed in range(12):
        (tmp_path / f"random{seed}.pth").write_bytes(rng.bytes(4096))
    for name in ("foreign.pth", *(f"random{seed}.pth" for seed in range(12))):
        status, err = _export(capsys, "--ckpt", tmp_path / name, "--out", tmp_path / f"out_{name}")
        assert status == 2 and len(err.splitlines()) == 1, err
        assert f"{tmp_path / name}: cannot be read with torch.load(weights_only=True): not a " in err
        assert "weights_only=False" not in err and "Weights only load failed" not in err
    assert "it would run Python code: " in _export(capsys, "--ckpt", tmp_path / "foreign.pth",
                                                   "--out", tmp_path / "o")[1]


# ----------------------------------------------------------------------------- training files
def test_truncated_training_state_names_the_file(tmp_path):
    from minigpt4.training.state import load_training_state

    model = torch.nn.Linear(40, 40)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 40)).sum().backward()
    optimizer.step()
    path = tmp_path / "training_state.pt"
    torch.save({"step": 3, "optimizer": optimizer.state_dict(), "pad": torch.zeros(4000)}, path)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ValueError, match=f"{path}: truncated or unreadable training state"):
        load_training_state(path)


def test_feature_cache_file_of_the_wrong_shape_and_a_full_disk(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from minigpt4.data import feature_cache
    from minigpt4.data.feature_cache import CachedTowerTokens, VisualFeatureCache

    key = "ab" * 32
    (tmp_path / "ab").mkdir()
    save_file({"tower": torch.zeros(5, 7)}, str(tmp_path / "ab" / f"{key}.safetensors"))
    tokens = CachedTowerTokens(tmp_path, [key], shape=(65, 64))
    with pytest.raises(ValueError, match=rf"{key}.safetensors holds a tensor of shape \(5, 7\), expected \(65, 64\)"):
        tokens[0]

    cache = VisualFeatureCache.__new__(VisualFeatureCache)
    cache.folder = tmp_path / "cache"

    def full_disk_open(path, mode="r", *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(feature_cache, "open", full_disk_open, raising=False)
    with pytest.raises(OSError) as caught:
        cache._write(key, torch.zeros(3, 4))
    from minigpt4.cli import error_message

    final = cache.folder / "ab" / f"{key}.safetensors"
    assert error_message(caught.value) == f"{final}: no space left on the device: free some space or choose another output folder"
    assert list((cache.folder / "ab").iterdir()) == []


def test_run_main_turns_os_errors_into_one_line_and_removes_what_the_command_created(tmp_path, capsys):
    from minigpt4.outputs import make_folder

    existing = tmp_path / "existing"
    existing.mkdir()

    def failing_main(argv):
        make_folder(existing / "a" / "b")  # creates a/ and a/b/: a/ is the command's
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(existing / "a" / "b" / "x.bin"))

    assert run_main(failing_main, [], prog="cmd") == 2
    assert capsys.readouterr().err.strip() == (f"cmd: error: {existing / 'a' / 'b' / 'x.bin'}: no space left on the "
                                               "device: free some space or choose another output folder")
    assert existing.is_dir() and os.listdir(existing) == []
    for code, hint in ((errno.EROFS, "read-only file system"), (errno.EACCES, "permission denied"),
                       (errno.EPERM, "operation not permitted"), (errno.ENOTDIR, "a path component is a file"),
                       (errno.EEXIST, "already exists")):
        def main(argv, code=code):
            raise OSError(code, os.strerror(code), "/some/out")

        assert run_main(main, [], prog="cmd") == 2
        assert capsys.readouterr().err.strip().startswith(f"cmd: error: /some/out: {hint}")


def test_evaluation_output_dir_follows_the_rule(tmp_path):
    import eval_detection

    preds = tmp_path / "preds.jsonl"
    preds.write_text(json.dumps({"dataset": "ABD", "volume_name": "c1", "target": "liver", "answer": "{<0><0><50><50>}",
                                 "gt_box": [0, 0, 100, 100], "width": 200, "height": 200}) + "\n")

    def rescore(out, *extra):
        return eval_detection.main(["--cfg-path", str(ROOT / "eval_configs" / "quickstart_cpu.yaml"), "--options",
                                    f"run.output_dir={out}", "--predictions", str(preds), "--bootstrap", "0",
                                    "--no-figures", *extra])

    rescore(tmp_path / "eval")
    assert json.loads((tmp_path / "eval" / "manifest.json").read_text())["command"] == "eval_detection"
    rescore(tmp_path / "eval")  # its own folder: re-run
    train_run = tmp_path / "run"
    train_run.mkdir()
    (train_run / "manifest.json").write_text(json.dumps({"command": "train"}))
    with pytest.raises(OutputFolderError, match="not a manifest written by eval_detection.py"):
        rescore(train_run)
    user = tmp_path / "user"
    user.mkdir()
    (user / "tables.md").write_text("my table")
    with pytest.raises(OutputFolderError, match="folder is not empty and has no manifest.json"):
        rescore(user)
    with pytest.raises(OutputFolderError, match=r"would replace 1 file\(s\) that eval_detection.py did not write \(tables.md\)"):
        rescore(user, "--overwrite")
    assert sorted(os.listdir(user)) == ["tables.md"] and (user / "tables.md").read_text() == "my table"


# ----------------------------------------------------------------------------- real write failures
def _file_size_limit(limit: int):
    """preexec_fn: the kernel refuses writes past ``limit`` bytes (EFBIG), as a full disk refuses
    them (ENOSPC), without a mount; SIGXFSZ ignored so the write returns the error."""
    import resource
    import signal

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_real_write_failures_of_safetensors_and_torch_save_become_os_errors(tmp_path):
    """safetensors' writer raises SafetensorError and torch.save a RuntimeError on a full disk:
    the atomic writers turn them into the OSError that names the file (nothing left behind)."""
    code = ("import sys, torch\nfrom minigpt4.io import save_safetensors_atomic, torch_save_atomic\n"
            "for write, name in ((save_safetensors_atomic, 'w.safetensors'), (torch_save_atomic, 'w.pt')):\n"
            "    target = sys.argv[1] + '/' + name\n"
            "    try:\n"
            "        write(target, {'a': torch.zeros(50_000)})\n"
            "    except OSError as err:\n"
            "        print(type(err).__name__, err.errno, err.filename)\n")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                          preexec_fn=_file_size_limit(20_000), cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.stdout.splitlines() == [f"OSError 27 {tmp_path / 'w.safetensors'}", f"OSError 27 {tmp_path / 'w.pt'}"], done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no temp file, no partial file


def test_export_and_training_on_a_full_disk_say_so_in_one_line(tmp_path):
    """The hostile run's remaining tracebacks: export and train.py when the disk fills up."""
    cfg = tiny_model_config(**{"vision.trainable": True})
    save_checkpoint(build_model(cfg), tmp_path / "ckpt")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    export = subprocess.run([sys.executable, "-m", "minigpt4.export", "--ckpt", str(tmp_path / "ckpt"), "--out",
                             str(tmp_path / "exp")], capture_output=True, text=True, cwd=ROOT, env=env,
                            preexec_fn=_file_size_limit(30_000))
    lines = export.stderr.strip().splitlines()
    assert export.returncode == 2 and len(lines) == 1 and "Traceback" not in export.stderr, export.stderr
    assert lines[0].startswith(f"python -m minigpt4.export: error: {tmp_path / 'exp'}/") and "file too large" in lines[0]
    assert not (tmp_path / "exp").exists()  # the failed export removed the folder it created
