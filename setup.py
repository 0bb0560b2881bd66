import re
from pathlib import Path

from setuptools import find_packages, setup

# read, not import: importing monai_qsa needs its dependencies installed
version = {
    "__version__": re.search(
        r'__version__ = "([^"]+)"', (Path(__file__).parent / "monai_qsa" / "__init__.py").read_text()
    )[1]
}

HERE = Path(__file__).parent


def bundle_data_files() -> list[tuple[str, list[str]]]:
    """The shipped bundles' configs, docs and licences, installed under ``<prefix>/share/monai_qsa/bundles`` where
    :func:`monai_qsa.bundle.bundles_dir` finds them (trained models, logs and data stay out)."""
    files = sorted(p for pattern in ("*/configs/*", "*/docs/*", "*/LICENSE") for p in (HERE / "bundles").glob(pattern))
    folders: dict[str, list[str]] = {}
    for path in files:
        relative = path.relative_to(HERE)
        folders.setdefault(str(Path("share/monai_qsa") / relative.parent), []).append(str(relative))
    return sorted(folders.items())


setup(
    name="monai_qsa",
    version=version["__version__"],
    description="Stand-alone self-attention networks for MONAI, quantised to int8 and measured for CPU deployment",
    long_description=(Path(__file__).parent / "README.md").read_text(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["monai_qsa", "monai_qsa.*"]),
    # the fused attention kernel's C source, compiled on the user's machine at first use
    package_data={"monai_qsa.networks.blocks": ["*.c"]},
    data_files=bundle_data_files(),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.8",
        "monai>=1.6,<1.7",
        "pytorch-ignite>=0.5",
        "nibabel>=5.2",
        "SimpleITK>=2.3",
        "itk>=5.3",
        "codecarbon>=2.8",
        "torchao>=0.14",
        "fire",
        "jsonschema",
        "tensorboard",
        "tqdm",
        "matplotlib",
    ],
    extras_require={"test": ["pytest>=8"]},
    entry_points={"console_scripts": ["monai-qsa=monai_qsa.__main__:main"]},
    license="Apache-2.0",
)
