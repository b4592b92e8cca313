"""``python -m minigpt4.quickstart``: the entry point of :mod:`minigpt4.commands.quickstart`."""

import sys

from minigpt4.cli import run_main
from minigpt4.commands.quickstart import main

if __name__ == "__main__":
    sys.exit(run_main(main, prog="quickstart"))
