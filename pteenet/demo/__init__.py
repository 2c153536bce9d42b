"""The end-to-end demo: real data, a trained backbone, exits attached, calibrated and measured.

``pteenet demo`` has to work on a laptop with no network, so nothing is downloaded: the data is
scikit-learn's bundled handwritten digits (1797 8x8 greyscale images, 10 classes), written out as
an ordinary image folder, and the "pretrained" backbone is a CIFAR ResNet-20 trained on it here in
seconds. Both are cached, so later runs only repeat the part being demonstrated: ``attach``,
``calibrate`` and ``bench``, exactly as a user would call them on their own model.

The package sits at the edge: it uses the library as a user would, and nothing in the core
imports it. ``settings`` holds the knobs, ``digits`` the data, ``backbone`` the stand-in
pretrained model, ``run`` the five stages.
"""

from __future__ import annotations

from pteenet.demo.backbone import train_backbone
from pteenet.demo.digits import DATA_MARKER, prepare_digits
from pteenet.demo.run import run_demo
from pteenet.demo.settings import DemoSettings, default_workdir

__all__ = [
    "DATA_MARKER",
    "DemoSettings",
    "default_workdir",
    "prepare_digits",
    "run_demo",
    "train_backbone",
]
