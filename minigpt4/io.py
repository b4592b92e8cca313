"""Small, torch-free file helpers shared by every part: atomic writes and JSON/JSONL.

Every output file is written to a temporary name in the same folder and renamed into place, so
an interrupted run never leaves a half-written file under the final name. All JSON the project
writes goes through :func:`to_json`: strict JSON (``allow_nan=False``), so a NaN or infinity
stops the command with the file and the key instead of leaving ``NaN`` that strict readers reject.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional


_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO}


def current_umask() -> int:
    """The process's umask, read without changing it where the system says it (Linux
    ``/proc/self/status``); elsewhere set and restored at once."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` if the block succeeds.

    The file gets the mode an ordinary ``open()`` would give it (0666 less the umask), not the
    0600 of the temporary file, so outputs are as readable as the user's umask says."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
    finally:
        os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except OSError as err:
        # a full or read-only disk while writing: name the file being written, never the temp name
        if err.errno in _WRITE_ERRNOS and err.filename in (None, tmp, str(tmp_path)):
            raise OSError(err.errno, err.strerror, str(path)) from None
        raise
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def save_safetensors_atomic(path: str | os.PathLike, tensors: dict, metadata: Optional[dict] = None) -> Path:
    """``safetensors.torch.save_file`` to a temporary name, renamed onto ``path``.

    safetensors' writer raises its own ``SafetensorError`` ("... (os error 28)") on a full or
    read-only disk; that becomes the ``OSError`` it describes, naming ``path``, so the entry
    points report it as one line like every other write error."""
    from safetensors.torch import save_file

    path = Path(path)
    with atomic_path(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except OSError:
            raise
        except Exception as err:  # noqa: BLE001 - SafetensorError is not importable as a stable name
            code = re.search(r"os error (\d+)", str(err))
            if code is None:
                raise
            number = int(code[1])
            raise OSError(number, os.strerror(number), str(path)) from None
    return path


def torch_save_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """``torch.save`` through memory to a temporary name, renamed onto ``path``: torch's file
    writer reports a full disk as ``RuntimeError`` (``unexpected pos``, ``iostream error``)
    without errno or file name, Python's write raises the ``OSError`` that names it."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes_atomic(path, buffer.getbuffer())
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def _non_finite(obj: Any, where: str = "") -> Optional[tuple[str, float]]:
    """``(key path, value)`` of the first NaN or infinity in nested dicts/lists, e.g. ``("tasks.tc.auc", nan)``."""
    if isinstance(obj, dict):
        items: Iterable = ((f"{where}.{key}" if where else str(key), value) for key, value in obj.items())
    elif isinstance(obj, (list, tuple)):
        items = ((f"{where}[{index}]", value) for index, value in enumerate(obj))
    else:
        try:
            value = float(obj)
        except (TypeError, ValueError):
            return None
        return None if math.isfinite(value) or isinstance(obj, (str, bytes)) else (where or "the value", value)
    for key, value in items:
        found = _non_finite(value, key)
        if found:
            return found
    return None


def to_json(obj: Any, *, indent: int | None = None, default: Optional[Callable[[Any], Any]] = None,
            sort_keys: bool = False, where: str = "") -> str:
    """``json.dumps`` that refuses NaN and infinity (``allow_nan=False``), naming the key.

    Raises:
        ValueError: ``<where>: <key path> is nan: JSON has no NaN or infinity (...)``.
    """
    try:
        return json.dumps(obj, indent=indent, default=default, sort_keys=sort_keys, allow_nan=False)
    except ValueError as err:
        if "JSON compliant" not in str(err):  # e.g. a circular reference: not ours to reword
            raise
        key, value = _non_finite(obj) or ("a value", float("nan"))
        prefix = f"{where}: " if where else ""
        raise ValueError(f"{prefix}{key} is {value}: JSON has no NaN or infinity, so it was not written "
                         "(a computation upstream gave a non-finite number)") from None


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> None:
    """Strict JSON (no NaN/infinity), written atomically."""
    write_text_atomic(path, to_json(obj, indent=indent, where=os.fspath(path)) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """Read JSON with an error that names the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None


def write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """One strict JSON object per line (no NaN/infinity), written atomically."""
    lines = (to_json(row, where=f"{os.fspath(path)}: row {number}") + "\n" for number, row in enumerate(rows, 1))
    write_text_atomic(path, "".join(lines))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err})") from None
    return rows


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """SHA-256 hex digest of a file's bytes, read in chunks (checkpoint identities, image keys)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
