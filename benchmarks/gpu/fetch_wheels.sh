#!/usr/bin/env bash
# Fetch what the GPU machine lacks into benchmarks/gpu/wheels/ (ignored by git), to carry there.
#
# The device image has torch, transformers, peft, numpy, PyYAML, sentencepiece, ... but not
# omegaconf (+ its antlr4 runtime), nibabel or pydicom, and it has no network. This downloads
# those wheels for CPython 3.12 / manylinux x86-64 (all four are pure Python), and copies the
# LLaMA-2 tokenizer from ../shared if present (benchmarks/full_size.py looks for it there).
#
#   bash benchmarks/gpu/fetch_wheels.sh        # here, once; then carry benchmarks/gpu/wheels
#
# Versions: the ones installed here (override with PACKAGES="name==version ...").
set -euo pipefail
cd "$(dirname "$0")/../.."
DEST=benchmarks/gpu/wheels
mkdir -p "$DEST"

version() { python3 -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null || true; }
if [ -z "${PACKAGES:-}" ]; then
    PACKAGES=""
    for name in omegaconf antlr4-python3-runtime nibabel pydicom; do
        v=$(version "$name")
        PACKAGES="$PACKAGES $name${v:+==$v}"
    done
fi
# shellcheck disable=SC2086
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEST" $PACKAGES

TOKENIZER=../shared/data/tokenizer/llama2/tokenizer.model
if [ -f "$TOKENIZER" ]; then
    cp "$TOKENIZER" "$DEST/llama2_tokenizer.model"
else
    echo "note: $TOKENIZER not found: the GPU run uses the project's tiny tokenizer (same sequence lengths)"
fi
ls -l "$DEST"
du -sh "$DEST"
