#!/usr/bin/env bash
# MONAI Label server environment for the bundles, in its own virtual environment (default: .venv-label), one line
# of output per step (pip itself runs quietly; its errors still show).
#
# monailabel 0.8.5 imports torchvision when it starts (monailabel.tasks.infer.bundle -> monailabel.transform.post ->
# torchvision.utils), unconditionally. PyPI's torchvision wheels are built against CUDA torch (their _C.so needs
# libtorch_cuda.so; PyPI has no CPU build) and cannot be imported beside the CPU-only torch 2.13.0 of the main
# environment ("operator torchvision::nms does not exist"), so the server gets a matching pair, torch 2.14.1 +
# torchvision 0.29.1 (CUDA builds, which run on the CPU; their NVIDIA libraries, 3.2 GB, are needed to import
# torch), in a venv of its own; the main environment keeps its CPU torch. Triton, which torch pulls in, compiles GPU
# kernels only: it is removed once everything is installed (0.9 GB; torch.compile on the CPU does not use it).
# monailabel and pydicom-seg go in with --no-deps (their declared requirements pull sam2, numpymaxflow and
# jsonschema<4); requirements-label.txt lists what monailabel imports, pydicom<3 because pydicom-seg 0.4.1 breaks on
# pydicom 3.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-label}"
step() { echo "[setup_label.sh ${SECONDS}s] $*"; }
install() { "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@"; }

step "1/6 creating the virtual environment $VENV"
python -m venv "$VENV"
step "2/6 installing torch 2.14.1 + torchvision 0.29.1 (CUDA builds, run on the CPU; the largest step)"
install torch==2.14.1 torchvision==0.29.1
step "3/6 installing requirements.txt (without its torch and triton pins) and requirements-label.txt"
# torch 2.14.1 brings its own triton; the main environment's pin (for torch 2.13) would make pip swap torch
grep -v -e '^torch==' -e '^triton' requirements.txt > "$VENV/requirements-main.txt"
install -r "$VENV/requirements-main.txt" -r requirements-label.txt
step "4/6 installing monailabel 0.8.5 and pydicom-seg 0.4.1 (--no-deps)"
install --no-deps monailabel==0.8.5 pydicom-seg==0.4.1
step "5/6 installing monai_qsa (editable)"
install --no-deps -e .
step "6/6 removing triton (GPU kernel compiler, unused on the CPU)"
"$VENV/bin/python" -m pip uninstall -q -y triton
CHECK="import monailabel, torchvision, monai_qsa; print('MONAI Label', monailabel.__version__, 'ready in', '$VENV')"
step "done: $("$VENV/bin/python" -c "$CHECK")"
