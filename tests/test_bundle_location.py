"""Bundles are found the same way everywhere: from a source checkout and from an installed wheel; a config's
bundle root is derived from its config file path, as ``ConfigWorkflow`` derives its config folder."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from monai_qsa.bundle import BUNDLES_ENV, bundle_dir, bundle_root_of, bundles_dir, find_bundle_root

REPO = Path(__file__).resolve().parents[1]


def test_bundles_of_a_source_checkout():
    assert bundles_dir() == REPO / "bundles"
    assert bundle_dir("sa_seg3d") == REPO / "bundles" / "sa_seg3d"


def test_unknown_bundle_names_the_known_ones():
    with pytest.raises(FileNotFoundError, match="no bundle 'sa_nope'.*sa_cls, sa_seg, sa_seg3d"):
        bundle_dir("sa_nope")


def test_environment_variable_takes_precedence(tmp_path, monkeypatch):
    (tmp_path / "sa_seg" / "configs").mkdir(parents=True)
    (tmp_path / "sa_seg" / "configs" / "metadata.json").write_text("{}")
    monkeypatch.setenv(BUNDLES_ENV, str(tmp_path))
    assert bundle_dir("sa_seg") == tmp_path / "sa_seg"


def test_bundles_of_an_installed_wheel(tmp_path):
    """Build the wheel, install it into a fresh virtual environment and find the bundles from outside the checkout."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        cwd=tmp_path,
    )
    env_dir = tmp_path / "env"
    venv.create(env_dir, system_site_packages=True, with_pip=False)
    python = env_dir / "bin" / "python"
    wheel = next(tmp_path.glob("monai_qsa-*.whl"))
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)], check=True
    )
    environment = {k: v for k, v in os.environ.items() if k != BUNDLES_ENV}
    found = subprocess.run(
        [str(python), "-c", "import monai_qsa.bundle as b; print(b.__file__); print(b.bundle_dir('sa_seg'))"],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=environment,
    ).stdout.split()
    assert Path(found[0]).is_relative_to(env_dir), "the wheel's package, not the checkout's, must be imported"
    installed = Path(found[1])
    assert installed == env_dir / "share" / "monai_qsa" / "bundles" / "sa_seg"
    assert (installed / "configs" / "train.json").read_bytes() == (
        REPO / "bundles/sa_seg/configs/train.json"
    ).read_bytes()
    assert not (installed / "models").exists()


@pytest.mark.parametrize(
    "config_file, root",
    [("bundles/sa_seg/configs/train.json", "bundles/sa_seg"), ("elsewhere/inference.json", "elsewhere")],
)
def test_bundle_root_of_a_config_file(tmp_path, monkeypatch, config_file, root):
    monkeypatch.chdir(tmp_path)
    assert bundle_root_of(config_file) == tmp_path / root


@pytest.mark.parametrize(
    "argv",
    [
        ["-m", "run", "--config_file", "bundles/sa_cls/configs/train.json"],
        ["-m", "run", "--config_file=bundles/sa_cls/configs/train.json", "--epochs", "1"],
        ["-m", "run", "--config_file", "['bundles/sa_cls/configs/train.json','bundles/sa_cls/configs/multi_gpu.json']"],
    ],
)
def test_find_bundle_root_from_the_command_line(tmp_path, monkeypatch, argv):
    monkeypatch.chdir(tmp_path)
    assert find_bundle_root(argv) == str(tmp_path / "bundles" / "sa_cls")


def test_find_bundle_root_without_config_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="--bundle_root"):
        find_bundle_root(["script.py"])
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "metadata.json").write_text("{}")
    assert find_bundle_root(["script.py"]) == str(tmp_path)
