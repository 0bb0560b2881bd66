#!/usr/bin/env bash
# Installs monai_qsa and everything it needs into the current Python environment, one line of output per step
# (pip itself runs quietly; its errors still show). torch goes first and pinned: that takes the CPU wheel, where
# an unpinned install would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
step() { echo "[setup.sh ${SECONDS}s] $*"; }
install() { python -m pip install -q --disable-pip-version-check "$@"; }

TORCH_PIN="$(grep -m1 '^torch==' requirements.txt)"
step "1/3 installing ${TORCH_PIN} (CPU wheel) into $(python -c 'import sys; print(sys.prefix)')"
install "$TORCH_PIN"
step "2/3 installing requirements.txt (MONAI, Ignite, ITK, CodeCarbon, torchao, TensorBoard, ...)"
install -r requirements.txt
step "3/3 installing monai_qsa (editable)"
install --no-deps -e .
VERSIONS='import torch, monai, monai_qsa
print("torch", torch.__version__, "MONAI", monai.__version__, "monai_qsa", monai_qsa.__version__)'
step "done: $(python -c "$VERSIONS")"
