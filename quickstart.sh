#!/usr/bin/env bash
# The README's main command: the whole pipeline on synthetic phantoms with the tiny model, on CPU.
# Installs the package first when it is not importable yet (fresh clone), then runs it.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import minigpt4, preprocessing, torch, transformers, peft" >/dev/null 2>&1; then
    echo "installing minigpt-pancreas (pip install -e .) ..."
    "$PYTHON" -m pip install -q -e .
fi
exec "$PYTHON" -m minigpt4.quickstart "$@"
