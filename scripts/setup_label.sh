#!/usr/bin/env bash
# MONAI Label server environment for the bundles, in its own virtual environment (default: .venv-label).
#
# monailabel 0.8.5 imports torchvision when it starts. PyPI's torchvision wheels are built against CUDA torch and
# cannot be imported beside the CPU-only torch 2.13.0 of the main environment ("operator torchvision::nms does
# not exist"), so the server gets a matching pair, torch 2.14.1 + torchvision 0.29.1 (CUDA builds, which run on the
# CPU), in a venv of its own; the main environment keeps its CPU torch. monailabel and pydicom-seg go in with
# --no-deps (their declared requirements pull sam2, numpymaxflow and jsonschema<4); requirements-label.txt lists
# what monailabel imports, pydicom<3 because pydicom-seg 0.4.1 breaks on pydicom 3.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-label}"
python -m venv "$VENV"
install() { "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@"; }
install torch==2.14.1 torchvision==0.29.1
grep -v '^torch==' requirements.txt > "$VENV/requirements-main.txt"
install -r "$VENV/requirements-main.txt" -r requirements-label.txt
install --no-deps monailabel==0.8.5 pydicom-seg==0.4.1
install --no-deps -e .
"$VENV/bin/python" -c "import monailabel, torchvision, monai_qsa; print('MONAI Label', monailabel.__version__, 'ready in', '$VENV')"
