"""A MONAI Label app for the monai_qsa bundles, classification included.

MONAI Label's ``monaibundle`` sample app serves every bundle as a segmenter: it restores the prediction to the
image grid and writes it as a label image, which fails for a classifier's ``(C,)`` class scores. This app is the
same app for local bundles, except that bundles whose output ``format`` in ``metadata.json`` is ``classes`` are
served as classifiers (MONAI Label's classification writer: a JSON list of class names and scores, no restore)
and get no training task (MONAI Label's datastore holds label images, not class indices).

Usage (bundles copied or linked into ``<app>/model/<name>``)::

    monailabel start_server --app apps/monai_qsa_label --studies STUDIES --conf models sa_cls,sa_seg3d \\
        --conf zoo_source github
"""

from __future__ import annotations

import json
import logging
import os

import monailabel
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random
from monailabel.tasks.infer.bundle import BundleInferTask
from monailabel.tasks.train.bundle import BundleTrainTask
from monailabel.utils.others.generic import get_bundle_models, strtobool

logger = logging.getLogger(__name__)


def is_classifier(bundle_path: str) -> bool:
    """Whether the bundle's first output is class scores (``"format": "classes"`` in ``network_data_format``)."""
    with open(os.path.join(bundle_path, "configs", "metadata.json")) as file:
        outputs = json.load(file)["network_data_format"]["outputs"]
    return next(iter(outputs.values())).get("format") == "classes"


class MyApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: dict) -> None:
        self.models = get_bundle_models(app_dir, conf)
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name=f"monai_qsa bundles ({monailabel.__version__})",
            description="Stand-alone self-attention bundles (segmentation and classification) from monai_qsa",
            version=monailabel.__version__,
        )

    def init_infers(self) -> dict[str, InferTask]:
        infers: dict[str, InferTask] = {}
        for name, path in self.models.items():
            if is_classifier(path):
                infers[name] = BundleInferTask(path, self.conf, type=InferType.CLASSIFICATION, add_post_restore=False)
            else:
                infers[name] = BundleInferTask(path, self.conf)
            logger.info(f"+++ Adding Inferer:: {name} => {infers[name]}")
        return infers

    def init_trainers(self) -> dict[str, TrainTask]:
        trainers: dict[str, TrainTask] = {}
        if strtobool(self.conf.get("skip_trainers", "false")):
            return trainers
        for name, path in self.models.items():
            if is_classifier(path):
                logger.info(f"+++ No Trainer for classifier {name}: train it with python -m monai.bundle run")
                continue
            task = BundleTrainTask(path, self.conf)
            if task.is_valid():
                trainers[name] = task
        return trainers

    def init_strategies(self) -> dict[str, Strategy]:
        return {"random": Random(), "first": First()}
