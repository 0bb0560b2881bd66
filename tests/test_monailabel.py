"""The bundles in a real MONAI Label server started on 127.0.0.1: the segmentation bundles in the ``monaibundle``
sample app shipped inside the monailabel wheel, unchanged (inference through ``BundleInferTask``, one epoch of
training through ``BundleTrainTask``, over HTTP); the classification bundle in this repository's
``apps/monai_qsa_label`` app.

The server runs in the MONAI Label environment made by ``scripts/setup_label.sh`` (``.venv-label``, or the folder
named by ``MONAI_QSA_LABEL_VENV``); the test fails, not skips, when it is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from monai_qsa.data import make_synthetic_dataset
from monai_qsa.inference.bundle_runner import BundleRunner

REPO = Path(__file__).resolve().parents[1]
LABEL_VENV = Path(os.environ.get("MONAI_QSA_LABEL_VENV", REPO / ".venv-label"))
TASK_OF_BUNDLE = {"sa_seg": "seg2d", "sa_seg3d": "seg3d", "sa_cls": "cls"}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _request(url: str, method: str = "GET", body: dict | None = None, timeout: float = 300) -> bytes:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"} if data else {}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read()


def _app(name: str, target: Path) -> Path:
    """Copy the wheel's ``monaibundle`` sample app (installed under the environment's prefix) or our app."""
    source = (
        LABEL_VENV / "monailabel" / "sample-apps" / "monaibundle" if name == "monaibundle" else REPO / "apps" / name
    )
    assert source.is_dir(), f"{source} missing"
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
    (target / "model").mkdir()
    return target


def _studies(task: str, root: Path) -> Path:
    """A studies folder of synthetic NIfTI images, with final label images for training (MONAI Label's layout)."""
    dataset = root / "dataset"
    make_synthetic_dataset(task, dataset, seed=3, num_cases=(4, 0, 0))
    studies = root / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    for image in sorted((dataset / "imagesTr").iterdir()):
        shutil.copy(image, studies / image.name)
        if (dataset / "labelsTr" / image.name).is_file():
            shutil.copy(dataset / "labelsTr" / image.name, studies / "labels" / "final" / image.name)
    return studies


def _half_foreground(bundle: Path, image: Path) -> None:
    """Shift the untrained network's last bias so that about half of ``image`` is labelled foreground (an untrained
    network labels everything background, which would hide a misplaced or flipped result)."""
    import torch

    runner = BundleRunner(bundle)
    data = runner.preprocess(image)
    with torch.no_grad():
        logits = runner.inferer(data["image"][None], runner.network)[0]
    checkpoint = torch.load(bundle / "models" / "model.pt")
    state = checkpoint["model"]  # the key MONAI Label reads
    last_bias = [key for key, value in state.items() if key.endswith("bias") and value.shape == (2,)][-1]
    state[last_bias][1] += float((logits[0] - logits[1]).median())
    torch.save(checkpoint, bundle / "models" / "model.pt")


@pytest.fixture
def label_server(tmp_path, untrained_bundle, request):
    """``monailabel start_server`` with an (app, bundle) pair; yields (base url, bundle folder, studies folder, log)."""
    executable = LABEL_VENV / "bin" / "monailabel"
    if not executable.is_file():
        pytest.fail(f"MONAI Label is not installed ({executable} missing): run scripts/setup_label.sh")
    app_name, name = request.param
    app = _app(app_name, tmp_path / "app")
    bundle = untrained_bundle(name, app / "model")
    studies = _studies(TASK_OF_BUNDLE[name], tmp_path)
    if name != "sa_cls":
        _half_foreground(bundle, min(studies.glob("*.nii.gz")))
    port = _free_port()
    log_path = tmp_path / "server.log"
    env = {
        **os.environ,
        # the monailabel launcher runs `python` from PATH: the label environment's (as after activating .venv-label)
        "PATH": f"{LABEL_VENV / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "VIRTUAL_ENV": str(LABEL_VENV),
        "BUNDLE_DOWNLOAD_SRC": "github",
        "MONAI_LABEL_TRACKING_ENABLED": "false",
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
    }
    command = [
        str(executable),
        "start_server",
        "--app",
        str(app),
        "--studies",
        str(studies),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        # local bundles only: any source but "monaihosting" makes MONAI Label use model/<name> without downloading
        "--conf",
        "models",
        name,
        "--conf",
        "zoo_source",
        "github",
        "--conf",
        "sam2",
        "false",
    ]
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, env=env, start_new_session=True
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                _request(f"{base}/info/", timeout=10)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"MONAI Label server did not start:\n{log_path.read_text()[-4000:]}")
                time.sleep(2)
        yield base, bundle, studies, log_path
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)


def _server_call(url: str, log_path: Path, method: str = "POST", body: dict | None = None) -> bytes:
    """A request to the server; on an HTTP error the test fails with the end of the server's log."""
    try:
        return _request(url, method=method, body=body)
    except urllib.error.HTTPError as error:
        pytest.fail(f"{method} {url}: {error}\n{log_path.read_text()[-4000:]}")


def _wait_for_training(base: str, log_path: Path, timeout: float = 420) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        task = json.loads(_request(f"{base}/train/"))
        if task.get("status") in ("DONE", "ERROR"):
            return task
        time.sleep(3)
    pytest.fail(f"training did not finish in {timeout} s:\n{log_path.read_text()[-4000:]}")


@pytest.mark.parametrize(
    "label_server", [("monaibundle", "sa_seg3d"), ("monaibundle", "sa_seg")], indirect=True, ids=["sa_seg3d", "sa_seg"]
)
def test_segmentation_bundle_infers_and_trains_in_monai_label(label_server, tmp_path):
    base, bundle, studies, log_path = label_server
    name = bundle.name
    info = json.loads(_request(f"{base}/info/"))
    log = log_path.read_text()
    assert f"Adding Bundle from Local: {name}" in log and "from NGC" not in log and "from Zoo" not in log  # no download
    assert name in info["models"], info["models"].keys()
    assert name in info["trainers"]
    channel_def = json.loads((bundle / "configs" / "metadata.json").read_text())["network_data_format"]["outputs"][
        "pred"
    ]["channel_def"]
    assert info["models"][name]["labels"] == {v: int(k) for k, v in channel_def.items() if v != "background"}

    image = min(studies.glob("*.nii.gz"))
    image_id = image.name[: -len(".nii.gz")]
    result = tmp_path / "result.nii.gz"
    result.write_bytes(_server_call(f"{base}/infer/{name}?image={image_id}&output=image", log_path))
    label, source = nib.load(result), nib.load(image)
    assert label.shape == source.shape
    label_map = np.asarray(label.dataobj).astype(int)
    assert set(np.unique(label_map)) <= {int(k) for k in channel_def}
    # the same label map as the bundle's own pipeline gives (the server runs another torch build: allow a few
    # voxels of near-ties to differ)
    runner = BundleRunner(bundle)
    expected = np.asarray(runner.predict(runner.preprocess(image)).pred).reshape(source.shape)
    assert 0.2 < expected.mean() < 0.8 and (label_map == expected).mean() > 0.99
    if source.ndim == 3:  # MONAI Label writes 2D results without geometry (its 2D path is for RGB images)
        np.testing.assert_allclose(label.affine, source.affine, atol=1e-4)

    model_file = bundle / "models" / "model.pt"
    before = model_file.stat().st_mtime_ns
    # run_fp32: the bundle's training without its int8 step (tested with the bundles themselves), to keep this short
    request = {"max_epochs": 1, "val_split": 0.5, "multi_gpu": False, "device": "cpu", "run_id": "run_fp32"}
    _server_call(f"{base}/train/{name}", log_path, body=request)
    task = _wait_for_training(base, log_path)
    assert task["status"] == "DONE", "\n".join(task.get("details", [])[-40:])
    # one epoch, validated (val_interval shrinks to max_epochs) and saved as the new best model
    assert (bundle / "models" / "checkpoint_epoch=1.pt").is_file()
    assert model_file.stat().st_mtime_ns > before


@pytest.mark.parametrize("label_server", [("monai_qsa_label", "sa_cls")], indirect=True, ids=["sa_cls"])
def test_classification_bundle_infers_in_our_app(label_server):
    base, bundle, studies, log_path = label_server
    info = json.loads(_request(f"{base}/info/"))
    channel_def = json.loads((bundle / "configs" / "metadata.json").read_text())["network_data_format"]["outputs"][
        "pred"
    ]["channel_def"]
    assert info["models"]["sa_cls"]["labels"] == {v: int(k) for k, v in channel_def.items()}
    assert "sa_cls" not in info["trainers"]  # the datastore holds label images, not class indices
    image_id = min(studies.glob("*.nii.gz")).name[: -len(".nii.gz")]
    prediction = json.loads(_server_call(f"{base}/infer/sa_cls?image={image_id}&output=json", log_path))["prediction"]
    assert [p["label"] for p in prediction] == [channel_def[str(i)] for i in range(len(channel_def))]
    assert sum(p["score"] for p in prediction) == pytest.approx(1.0, abs=1e-4)  # softmax class scores
