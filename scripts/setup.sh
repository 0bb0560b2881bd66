#!/usr/bin/env bash
# Installs monai_qsa and everything it needs. torch goes first and pinned: that takes the CPU wheel,
# where an unpinned install would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --disable-pip-version-check "$(grep -m1 '^torch==' requirements.txt)"
python -m pip install -q --disable-pip-version-check -r requirements.txt
python -m pip install -q --disable-pip-version-check --no-deps -e .
