"""``python -m minigpt4.export``: the entry point of :mod:`minigpt4.commands.export`."""

import sys

from minigpt4.commands.export import main

if __name__ == "__main__":
    sys.exit(main())
