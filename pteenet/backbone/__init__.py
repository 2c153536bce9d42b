"""The backbone: the registry (CIFAR ResNets, timm, torchvision), checkpoints and the
evaluation preprocessing."""

from pteenet.backbone._cifar_resnet import (
    CIFAR_DEPTHS,
    CifarResNet,
    cifar_resnet,
)
from pteenet.backbone._preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    INTERPOLATIONS,
    MAX_INPUT_SIDE,
    Preprocess,
)
from pteenet.backbone._registry import (
    CIFAR_URLS,
    SOURCES,
    Backbone,
    create_backbone,
    freeze,
    load_state_dict_file,
    resolve_name,
    sha256_file,
)

__all__ = [
    "Backbone",
    "CIFAR_DEPTHS",
    "CIFAR_URLS",
    "CifarResNet",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "INTERPOLATIONS",
    "MAX_INPUT_SIDE",
    "Preprocess",
    "SOURCES",
    "cifar_resnet",
    "create_backbone",
    "freeze",
    "load_state_dict_file",
    "resolve_name",
    "sha256_file",
]
