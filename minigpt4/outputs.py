"""One rule for output folders, used by every command that writes one.

``python -m preprocessing``, ``train.py`` (``run.output_dir``), ``eval_detection.py`` /
``eval_classification.py`` (``run.output_dir``) and ``python -m minigpt4.export`` (``--out``)
open their folder with :class:`OutputFolder`, which enforces:

* **ownership**: a folder is the command's own only if its ``manifest.json`` says so (the
  command passes ``owns(manifest) -> bool``); a folder without such a manifest is refused unless
  it is empty, or ``--overwrite`` is given, and even then :meth:`OutputFolder.check_no_foreign`
  refuses to replace a file the command did not write;
* **not the project's files**: a folder inside a git work tree that holds tracked files (e.g.
  ``export --out .`` in the repository root) is refused;
* **a path that can be a folder**: ``--out`` that is a file, or lies under a file, is refused;
* **one writer**: an exclusive lock (``filelock``, file ``.minigpt4.lock``) is held while the
  command writes; a second run into the same folder stops at once, naming the first one's PID
  and host (``.minigpt4.lock.owner``); both files are removed when the command ends;
* **nothing left behind**: when the command fails, the entries it created at the folder's top
  level (the folder itself when it was new) are removed, unless it called :meth:`OutputFolder.keep`
  (a training run keeps its folder once a resumable checkpoint exists).

Files inside are written with :func:`minigpt4.io.atomic_path` (temporary name + rename).

API for other commands (e.g. the cascade evaluation)::

    from minigpt4.outputs import OutputFolder
    with OutputFolder(out, "eval_cascade", overwrite=args.overwrite) as folder:
        folder.check_no_foreign(["metrics.json", "tables.md"])   # with --overwrite into a foreign folder
        ...write files under folder.path...
        folder.write_manifest({"status": "complete"})            # {"command": "eval_cascade", ...}
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

from minigpt4.io import read_json, write_json_atomic

MANIFEST_NAME = "manifest.json"
LOCK_NAME = ".minigpt4.lock"
LOCK_OWNER_NAME = ".minigpt4.lock.owner"
_BOOKKEEPING = {LOCK_NAME, LOCK_OWNER_NAME}
"""Files of the lock itself: they never make a folder 'not empty' or 'foreign'."""


class OutputFolderError(ValueError):
    """An output folder the command may not write into; the message names it and says why."""


class FolderBusyError(OutputFolderError):
    """Another run holds the folder's lock."""


# ----------------------------------------------------------------------------- created paths
_created: list[Path] = []
"""Paths created by the running command, removed by :func:`remove_created` when it fails."""


def track_created(path: os.PathLike | str) -> None:
    """Remember a path this command created (removed if the command fails)."""
    _created.append(Path(path))


def remove_created() -> list[Path]:
    """Remove every tracked path (newest first), ignoring ones already gone; returns them."""
    removed = []
    while _created:
        path = _created.pop()
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
            else:
                continue
        except OSError:  # best effort: the original error is the one to report
            continue
        removed.append(path)
    return removed


def forget_created(paths: Optional[Iterable[Path]] = None) -> None:
    """Stop tracking ``paths`` (default: all); they are kept whatever happens next."""
    if paths is None:
        _created.clear()
        return
    drop = {Path(p) for p in paths}
    _created[:] = [p for p in _created if p not in drop]


def make_folder(path: os.PathLike | str) -> Path:
    """``mkdir -p`` that tracks the highest folder it created (see :func:`track_created`)."""
    path = Path(path)
    missing = [p for p in [path, *path.parents] if not p.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:  # e.g. a read-only folder half-way down: remove the parents made so far
        for made in missing:
            if made.is_dir():
                shutil.rmtree(made, ignore_errors=True)
        raise
    if missing:
        track_created(missing[-1])
    return path


# ----------------------------------------------------------------------------- checks
def check_folder_path(out: Path, option: str = "--out") -> None:
    """Refuse a path that is a file or lies under a file (before anything is created)."""
    if out.exists() and not out.is_dir():
        raise OutputFolderError(f"{out}: {option} exists and is not a folder; choose a folder")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputFolderError(f"{out}: {option} lies under {parent}, which is a file, not a folder; "
                                        "choose another output path")
            break


def _work_tree(path: Path) -> Optional[Path]:
    for candidate in [path, *path.parents]:
        if (candidate / ".git").exists():
            return candidate
    return None


def tracked_files(out: Path) -> list[str]:
    """Files tracked by git inside ``out`` (relative to ``out``), [] outside a git work tree.

    Without a usable ``git`` the work tree's root itself counts as tracked (``.``)."""
    target = out.resolve()
    existing = next((p for p in [target, *target.parents] if p.exists()), target)
    root = _work_tree(existing)
    if root is None:
        return []
    rel = target.relative_to(root)
    try:
        listed = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--", f":(literal){rel.as_posix()}"],
                                capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        listed = None
    if listed is None or listed.returncode != 0:
        return ["."] if rel == Path(".") else []
    prefix = "" if rel == Path(".") else rel.as_posix() + "/"
    return [name[len(prefix):] for name in listed.stdout.decode("utf-8", "replace").split("\0") if name]


_SOURCE_DIRS = (Path(__file__).resolve().parent, Path(__file__).resolve().parent.parent / "preprocessing")


def check_not_tracked(out: Path, option: str = "--out") -> None:
    """Refuse a folder holding files of a git work tree (the project's own README.md ...), and,
    with or without git, the project's root and its package folders."""
    target = out.resolve()
    root = _SOURCE_DIRS[0].parent
    if any(target == d or d in target.parents for d in _SOURCE_DIRS) or (
            target == root and (root / "pyproject.toml").is_file()):
        raise OutputFolderError(f"{out}: {option} is the project's own source folder; choose another folder "
                                "(e.g. output/...)")
    tracked = tracked_files(out)
    if tracked:
        shown = ", ".join(tracked[:3]) + (", ..." if len(tracked) > 3 else "")
        raise OutputFolderError(f"{out}: {option} holds {len(tracked)} file(s) tracked by git ({shown}); writing "
                                "there could replace them: choose a folder outside the repository or an untracked "
                                "one (e.g. output/...)")


def check_not_input(out: Path, inputs: Sequence, option: str = "--out") -> None:
    """Refuse an output folder that equals, contains or lies inside an input (file or folder)."""
    out_abs = Path(out).resolve()
    for item in inputs:
        if not item:
            continue
        src = Path(item).resolve()
        if out_abs == src or out_abs in src.parents or src in out_abs.parents:
            raise OutputFolderError(f"{out}: {option} must not equal, contain or lie inside the input {item}; "
                                    "choose a separate output folder")


def visible_entries(out: Path) -> list[str]:
    """Names in ``out`` other than the lock's own files."""
    return sorted(name for name in os.listdir(out) if name not in _BOOKKEEPING) if out.is_dir() else []


def read_manifest(out: Path) -> Optional[object]:
    """The parsed ``manifest.json`` of ``out`` (None when absent; ``False`` when unreadable)."""
    path = out / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        return read_json(path)
    except ValueError:
        return False


def check_output_folder(out: Path, command: str, owns: Callable[[dict], bool], overwrite: bool,
                        inputs: Sequence = (), option: str = "--out", owner: Optional[str] = None,
                        legacy: Optional[Callable[[Path], bool]] = None) -> Optional[dict]:
    """Check that ``command`` may write into ``out``; nothing is created.

    Returns:
        The folder's manifest when it is the command's own (``owns(manifest)``; or ``{}`` when
        ``legacy(out)`` recognises a folder an older version wrote without one), None for a new
        or empty folder, or a non-empty foreign one accepted with ``overwrite``.
    Raises:
        OutputFolderError: a file or under a file, an input, tracked by git, someone else's
            manifest, or not empty without ``overwrite``.
    """
    out = Path(out)
    owner = owner or command
    check_folder_path(out, option)
    check_not_input(out, inputs, option)
    check_not_tracked(out, option)
    check_not_busy(out, option)  # before the content: a run in progress explains a folder without manifest
    manifest = read_manifest(out)
    if manifest is not None:
        if isinstance(manifest, dict) and owns(manifest):
            return manifest
        raise OutputFolderError(f"{out / MANIFEST_NAME}: not a manifest written by {owner}; "
                                f"choose another {option}")
    if legacy is not None and out.is_dir() and legacy(out):
        return {}
    if visible_entries(out) and not overwrite:
        raise OutputFolderError(f"{out}: folder is not empty and has no {MANIFEST_NAME} (not written by {owner}); "
                                f"choose an empty or new {option}, or add --overwrite to write next to its files "
                                "(they are kept)")
    return None


def check_no_foreign(out: Path, manifest: Optional[dict], names: Iterable[str], owner: str,
                     option: str = "--out") -> None:
    """Refuse to replace an existing ``names`` entry of ``out`` (relative paths) when ``manifest``
    (what :func:`check_output_folder` returned) is None: a folder without the command's manifest
    holds only other people's files. Callable before anything is created (every rank).

    Raises:
        OutputFolderError: naming the files.
    """
    if manifest is not None:
        return
    out = Path(out)
    foreign = sorted(n for n in names if (out / n).exists() or (out / n).is_symlink())
    if foreign:
        raise OutputFolderError(f"{out}: would replace {len(foreign)} file(s) that {owner} did not write "
                                f"({', '.join(foreign[:5])}); move them away or choose another {option}")


# ----------------------------------------------------------------------------- the lock
_held_locks: set[str] = set()
"""Lock files this process holds (:meth:`OutputFolder._acquire`)."""


def check_not_busy(out: Path, option: str = "--out") -> None:
    """Refuse a folder whose lock another run holds (tried without waiting, released at once).

    Raises:
        FolderBusyError: "another run is writing into this folder (PID ... on host ...)".
    """
    from filelock import FileLock, Timeout

    lock_file = Path(out) / LOCK_NAME
    if not lock_file.is_file() or os.path.realpath(lock_file) in _held_locks:
        return  # no lock, or this process holds it (a command checking its own folder again)
    probe = FileLock(str(lock_file), timeout=0)
    try:
        probe.acquire()
    except Timeout:
        raise FolderBusyError(f"{out}: another run is writing into this folder ({_describe_owner(Path(out))}); "
                              f"wait for it to finish or choose another {option}") from None
    except OSError:  # unreadable lock: the real acquisition names the problem
        return
    probe.release()


def _describe_owner(out: Path) -> str:
    try:
        info = json.loads((out / LOCK_OWNER_NAME).read_text(encoding="utf-8"))
        return f"PID {info['pid']} on host {info['host']}, {info.get('command', '?')} started {info.get('started', '?')}"
    except (OSError, ValueError, KeyError, TypeError):
        return "PID unknown"


class OutputFolder:
    """Context manager: check, create, lock ``path`` for ``command``; clean up after a failure.

    Args:
        path: the output folder.
        command: the manifest's ``command`` (``"train"``, ``"export"``, ...).
        owns: which manifests are this command's (default ``manifest["command"] == command``).
        overwrite: ``--overwrite`` (write into a foreign non-empty folder, next to its files).
        inputs: input files/folders the output must not overlap.
        option: how the user named the folder (``--out``, ``run.output_dir``), for messages.
        legacy: recognises a folder of this command written before manifests existed.
    Attributes:
        manifest: the folder's own manifest (dict) or None (new, empty or foreign).
    """

    def __init__(self, path: os.PathLike | str, command: str, owns: Optional[Callable[[dict], bool]] = None,
                 overwrite: bool = False, inputs: Sequence = (), option: str = "--out",
                 owner: Optional[str] = None, legacy: Optional[Callable[[Path], bool]] = None) -> None:
        self.path = Path(path)
        self.command = command
        self.owns = owns or (lambda manifest: manifest.get("command") == command)
        self.overwrite, self.inputs, self.option, self.owner, self.legacy = overwrite, inputs, option, owner, legacy
        self.manifest: Optional[dict] = None
        self._lock = None
        self._before: Optional[set[str]] = None
        self._new = False
        self._kept = False

    # -- entering
    def __enter__(self) -> "OutputFolder":
        self.manifest = check_output_folder(self.path, self.command, self.owns, self.overwrite, self.inputs,
                                            self.option, self.owner, self.legacy)
        self._new = not self.path.exists()
        self._before = set() if self._new else set(os.listdir(self.path))
        make_folder(self.path)  # tracks the highest folder it created
        try:
            self._acquire()
        except BaseException:
            self._cleanup()
            raise
        return self

    def _acquire(self) -> None:
        from filelock import FileLock, Timeout

        lock = FileLock(str(self.path / LOCK_NAME), timeout=0)
        try:
            lock.acquire()
        except Timeout:  # (an OSError subclass)
            raise FolderBusyError(f"{self.path}: another run is writing into this folder ({_describe_owner(self.path)}); "
                                  f"wait for it to finish or choose another {self.option}") from None
        except OSError as err:  # read-only, full, no permission: name the folder, not the lock file
            if err.errno is None:
                raise
            raise OSError(err.errno, err.strerror, str(self.path)) from None
        self._lock = lock
        _held_locks.add(os.path.realpath(self.path / LOCK_NAME))
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                 "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        write_json_atomic(self.path / LOCK_OWNER_NAME, owner)

    # -- while writing
    def check_no_foreign(self, names: Iterable[str]) -> None:
        """Refuse to replace an existing ``names`` entry (relative paths) that is not the command's
        own: in a folder without our manifest every existing file is someone else's."""
        check_no_foreign(self.path, self.manifest, names, self.owner or self.command, self.option)

    def write_manifest(self, content: dict) -> Path:
        """Write ``manifest.json`` = ``{"command": command, **content}`` atomically."""
        path = self.path / MANIFEST_NAME
        write_json_atomic(path, {"command": self.command, **content})
        self.manifest = {"command": self.command, **content}
        return path

    def keep(self) -> None:
        """From now on a failure keeps what was written (e.g. a resumable checkpoint exists)."""
        self._kept = True

    # -- leaving
    def _release(self) -> None:
        if self._lock is not None:
            for name in (LOCK_OWNER_NAME, LOCK_NAME):  # removed while still held: no stray files left
                try:
                    (self.path / name).unlink()
                except OSError:
                    pass
            self._lock.release()
            self._lock = None
            _held_locks.discard(os.path.realpath(self.path / LOCK_NAME))

    def _cleanup(self) -> None:
        """Remove what this command created at the folder's top level (all of it when new)."""
        self._release()
        if self._kept:
            forget_created([self.path])
            return
        if self._new:
            remove_created()
            return
        for name in sorted(set(os.listdir(self.path)) - (self._before or set())):
            track_created(self.path / name)
        remove_created()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None or exc_type is KeyboardInterrupt:
            # success, or Ctrl-C (an interrupted run's files let a re-run continue)
            self._release()
            forget_created()
            return
        self._cleanup()
