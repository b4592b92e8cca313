"""``demo.py``: the command line of the clinician's chat demo (:mod:`minigpt4.demo`); see the
top-level ``demo.py`` for usage."""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Optional, Sequence

from minigpt4.cli import USER_ERRORS, error_message, setup_logging
from minigpt4.config import add_config_arguments, load_config
from minigpt4.demo.app import build_app, launch, parse_size, private_workdir
from minigpt4.demo.service import load_service
from minigpt4.inference.readers import Limits

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="The clinician's chat demo (paper §3.9): a Gradio app serving one checkpoint.")
    add_config_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--share", action="store_true", help="also open a public Gradio link (off by default)")
    parser.add_argument("--device", default=None, help="override run.device (cpu, cuda, cuda:N)")
    parser.add_argument("--max-file-size", default="1gb", help="largest accepted upload, e.g. 200mb (default 1gb)")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    setup_logging(args.debug)

    try:
        max_bytes = parse_size(args.max_file_size)
        cfg = load_config(args.cfg_path, args.options)
        limits = Limits(max_volume_bytes=max_bytes, max_slice_bytes=min(Limits().max_slice_bytes, max_bytes))
        service = load_service(cfg, device=args.device, limits=limits)
    except USER_ERRORS as err:  # ConfigError is a ValueError
        if args.debug:
            raise
        print(f"demo.py: error: {error_message(err)}", file=sys.stderr)
        return 2
    if service.warning:
        print(f"WARNING: {service.warning}", file=sys.stderr)
    if args.host not in LOCAL_HOSTS:
        print(f"WARNING: binding to {args.host}: anyone who can reach this machine can use the demo "
              "(no authentication).", file=sys.stderr)
    if args.share:
        print("WARNING: --share opens a public link to this demo (no authentication).", file=sys.stderr)
    # SIGTERM (service managers, tests) exits normally, so the private temp folder is removed
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    workdir = private_workdir()
    print(f"private temp folder (uploads, outputs; removed at exit): {workdir}", flush=True)
    app = build_app(service, workdir=workdir)
    launch(app, host=args.host, port=args.port, share=args.share, max_file_size=max_bytes)
    return 0
