"""The prepared folder as an output (msd / nih / abd / tc): who owns which file, by the manifest.

A folder is ours when its ``manifest.json`` names a dataset of this package; a re-run deletes or
replaces only the files that manifest lists (``files``; an interrupted run also owns the PNGs of
its ``volumes_in_progress``), never a file another tool wrote. The general rules of every output
folder live in :mod:`minigpt4.outputs`; these add the prepared folder's own.
"""

from __future__ import annotations

import platform
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from minigpt4 import outputs


class PreparationError(ValueError):
    """A problem with the inputs or the output folder as a whole."""


def versions() -> dict:
    import nibabel
    import PIL
    import pydicom

    return {"python": platform.python_version(), "numpy": np.__version__, "nibabel": nibabel.__version__,
            "pydicom": pydicom.__version__, "pillow": PIL.__version__}


# Options that say how a run behaves, not what it writes: a re-run may change them freely.
RUN_OPTIONS = ("on_error", "workers", "overwrite", "progress")
PREPARED_KINDS = ("MSD", "NIH", "ABD", "TC", "PANORAMA")
OWN_PNG = re.compile(r"slices/(?P<volume>.+)_slice_\d+\.png")
_TEMP = re.compile(r"\..+\.tmp")  # minigpt4.io.atomic_path leftovers of an interrupted run


def owned_files(out: Path, manifest: dict) -> set[str]:
    """Files (relative paths) of ``out`` that its manifest says a run of this package wrote.

    ``files`` lists a finished run's outputs; an unfinished run also owns the PNGs of
    ``volumes_in_progress``. Manifests written before ``files`` existed own what that version
    treated as its own: ``slices/*_slice_<N>.png`` and ``annotations/*.json``.
    """
    existing = set()
    for folder in ("slices", "annotations"):
        if (out / folder).is_dir():
            existing.update(f"{folder}/{p.name}" for p in (out / folder).iterdir() if p.is_file())
    if "files" not in manifest:
        return {f for f in existing if OWN_PNG.fullmatch(f) or re.fullmatch(r"annotations/[^/]+\.json", f)}
    owned = set(manifest["files"]) & existing
    pending = set(manifest.get("volumes_in_progress") or ())
    owned.update(f for f in existing if (m := OWN_PNG.fullmatch(f)) and m["volume"] in pending)
    return owned


def check_prepared_folder(out: Path, parameters: dict, overwrite: bool, inputs: Sequence = (),
                        kinds: Sequence[str] = PREPARED_KINDS) -> set[str]:
    """Check that a run may write into ``out``; returns the files there that earlier runs wrote.

    The rules of every output folder (:func:`minigpt4.outputs.check_output_folder`: not a file,
    not an input, no git-tracked files, a manifest of this package (``dataset`` in ``kinds``) or
    empty unless ``overwrite``, and even then foreign files are never deleted or replaced, see
    :func:`check_no_foreign`), plus: a folder made with other parameters is refused unless
    ``overwrite``.
    """
    out = Path(out)
    owner = f"python -m preprocessing for {'/'.join(kinds)}"
    try:
        old = outputs.check_output_folder(
            out, "preprocessing", lambda m: m.get("dataset") in kinds and isinstance(m.get("parameters"), dict),
            overwrite, inputs=inputs, owner=owner)
    except outputs.OutputFolderError as err:
        raise PreparationError(str(err)) from None
    if old is None:
        return set()
    old_params = {k: v for k, v in old["parameters"].items() if k not in RUN_OPTIONS}
    new_params = {k: v for k, v in parameters.items() if k not in RUN_OPTIONS}
    if old_params != new_params and not overwrite:
        diff = sorted(k for k in set(new_params) | set(old_params) if old_params.get(k) != new_params.get(k))
        raise PreparationError(f"{out}: folder was prepared with different parameters ({', '.join(diff)}); "
                               "use --overwrite to replace it or choose another --out")
    return owned_files(out, old)


def check_no_foreign(out: Path, owned: set[str], would_write) -> None:
    """Refuse to replace a file in ``slices/`` or ``annotations/`` that no run of ours wrote.

    ``would_write(rel)`` says whether this run may write the relative path ``rel``.
    """
    foreign = []
    for folder in ("slices", "annotations"):
        if (out / folder).is_dir():
            foreign += sorted(rel for p in (out / folder).iterdir()
                              if (rel := f"{folder}/{p.name}") not in owned and would_write(rel))
    if foreign:
        raise PreparationError(f"{out}: would replace {len(foreign)} file(s) that python -m preprocessing did not "
                               f"write ({', '.join(foreign[:5])}); move them away or choose another --out")


def clean_stale(out: Path, owned: set[str], keep: set[str], temporaries: bool = True) -> int:
    """Remove the files earlier runs wrote (``owned``) that this run did not write (``keep``),
    and (``temporaries``: the folder had our manifest) temporary leftovers of an interrupted
    run; never anything else."""
    removed = 0
    for rel in sorted(owned - keep):
        path = out / rel
        if path.is_file():
            path.unlink()
            removed += 1
    for folder in (out / "slices", out / "annotations"):
        if temporaries and folder.is_dir():
            for p in folder.iterdir():
                if _TEMP.fullmatch(p.name) and p.is_file():
                    p.unlink()
                    removed += 1
    return removed
