"""What every entry point does around its ``main(argv)``: logging, and errors as one line.

Every top-level script (``train.py``, ``eval_detection.py``, ``eval_classification.py``,
``eval_cascade.py``, ``scan.py``, ``demo.py``) and ``python -m minigpt4.export|inspect|quickstart``
ends with ``sys.exit(run_main(main, prog=...))``, ``main`` from :mod:`minigpt4.commands`. Their ``main``
functions raise (so tests can assert the exception); :func:`run_main` turns the errors a user
can fix — a bad config, a missing or unreadable file, a folder that cannot be written (ENOSPC,
EROFS, EACCES, EPERM, ENOTDIR, EEXIST: the path and a hint) — into

    <prog>: error: <file or key>: <what is wrong and what to do>

on stderr and exit status 2 (argparse's status for a bad command line), without a traceback,
after removing what the failed command created (:mod:`minigpt4.outputs`).
``--debug`` shows the traceback instead. Anything else (a bug) keeps its traceback.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
from typing import Callable, Optional, Sequence

from minigpt4.outputs import remove_created

USER_ERRORS = (ValueError, OSError, FloatingPointError)
"""Errors with a message meant for the user: ``ConfigError`` and every input check raise
``ValueError``; missing, unreadable or unwritable files raise ``OSError`` subclasses."""

_OS_HINTS = {
    errno.EACCES: "permission denied: choose a folder you can write to, or fix its permissions",
    errno.EPERM: "operation not permitted: choose a folder you can write to, or fix its permissions",
    errno.ENOTDIR: "a path component is a file, not a folder: choose another output path",
    errno.EISDIR: "is a folder where a file was expected",
    errno.ENOSPC: "no space left on the device: free some space or choose another output folder",
    errno.EROFS: "read-only file system: choose another output folder",
    errno.EEXIST: "already exists: remove it or choose another output path",
    errno.EDQUOT: "disk quota exceeded: free some space or choose another output folder",
    errno.EFBIG: "file too large for this file system or the process's file-size limit: choose another output folder",
}


def add_debug_argument(parser) -> None:
    """``--debug``: show the traceback of an error instead of the one-line message."""
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error")


def add_provenance_argument(parser) -> None:
    """``--allow-unknown-provenance`` (``train.py``, the eval scripts): accept an own checkpoint
    saved without recorded provenance (see :mod:`minigpt4.provenance`)."""
    parser.add_argument("--allow-unknown-provenance", action="store_true",
                        help="accept an own checkpoint that records no training provenance (older format): it is "
                             "then checked against its config.yaml and today's folders instead of refused")


def setup_logging(debug: bool = False) -> None:
    """INFO (``--debug``: DEBUG) records of the package to stderr, e.g. the weight-load reports.

    Third-party libraries stay at WARNING so their INFO chatter does not bury ours.
    """
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    level = logging.DEBUG if debug else logging.INFO
    for name in ("minigpt4", "preprocessing", "__main__"):
        logging.getLogger(name).setLevel(level)


def error_message(err: BaseException) -> str:
    """One line for a user error: the file or key first, then what is wrong."""
    if isinstance(err, OSError) and err.errno is not None and err.filename is not None:
        # raised by the OS (open, mkdir, rename): "[Errno 13] Permission denied: 'x'" → "x: permission denied: ..."
        where = os.fspath(err.filename)
        if err.filename2 is not None:
            where += f" -> {os.fspath(err.filename2)}"
        what = _OS_HINTS.get(err.errno) or (err.strerror or str(err)).lower()
        if err.errno == errno.ENOENT:
            what = "file or folder not found"
        return f"{where}: {what}"
    if isinstance(err, OSError) and err.errno in _OS_HINTS:  # e.g. a write that hit a full disk
        return _OS_HINTS[err.errno]
    return str(err).strip() or type(err).__name__


def _remove_created() -> None:
    """Remove what the failed command created (minigpt4.outputs tracks it)."""
    remove_created()


def run_main(main: Callable[[Optional[Sequence[str]]], object], argv: Optional[Sequence[str]] = None,
             prog: Optional[str] = None) -> int:
    """Call an entry point's ``main(argv)`` with logging set up and user errors as one line.

    Returns:
        The exit status: ``main``'s when it returns an int, else 0; 2 for a user error; 130
        for Ctrl-C.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or os.path.basename(sys.argv[0]) or "minigpt4"
    debug = "--debug" in argv
    setup_logging(debug)
    try:
        status = main(argv)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as err:
        _remove_created()
        if debug:
            raise
        print(f"{prog}: error: {error_message(err)}", file=sys.stderr)
        return 2
    return status if isinstance(status, int) else 0
