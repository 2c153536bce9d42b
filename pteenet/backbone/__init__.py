"""The backbone: the registry (CIFAR ResNets, timm, torchvision), checkpoints and the
evaluation preprocessing."""

from pteenet._face import lazy_face

_NAMES = {
    "CIFAR_DEPTHS": "_cifar_resnet",
    "CifarResNet": "_cifar_resnet",
    "cifar_resnet": "_cifar_resnet",
    "IMAGENET_MEAN": "_preprocess",
    "IMAGENET_STD": "_preprocess",
    "INTERPOLATIONS": "_preprocess",
    "MAX_INPUT_SIDE": "_preprocess",
    "Preprocess": "_preprocess",
    "Backbone": "_registry",
    "CIFAR_URLS": "_registry",
    "SOURCES": "_registry",
    "create_backbone": "_registry",
    "label_names": "_registry",
    "list_backbones": "_registry",
    "backbone_classes": "_classes",
    "read_checkpoint": "_checkpoint",
    "freeze": "_registry",
    "load_state_dict_file": "_checkpoint",
    "resolve_name": "_registry",
    "sha256_file": "_registry",
}
__all__ = sorted(_NAMES)
__getattr__, __dir__ = lazy_face(__name__, _NAMES)
