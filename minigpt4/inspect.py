"""``python -m minigpt4.inspect``: the entry point of :mod:`minigpt4.commands.inspect`."""

import sys

from minigpt4.cli import run_main
from minigpt4.commands.inspect import main

if __name__ == "__main__":
    sys.exit(run_main(main, prog="python -m minigpt4.inspect"))
