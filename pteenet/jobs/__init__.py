"""The jobs the commands run: inspect a backbone, attach exits to it, predict with them."""

from pteenet._face import lazy_face

_NAMES = {
    "AttachResult": "_attach",
    "STATE_FILE": "_attach",
    "WARN_SHARE": "_attach",
    "attach": "_attach",
    "compat_row": "_compat",
    "inspect": "_inspect",
    "InspectResult": "_inspect",
    "CutInfo": "_inspect",
    "Prediction": "_predict",
    "PredictResult": "_predict",
    "find_images": "_predict",
    "predict": "_predict",
}
__all__ = sorted(_NAMES)
__getattr__, __dir__ = lazy_face(__name__, _NAMES)
