"""Graph sessions: each exported segment or branch loaded as a function of numpy arrays.

onnxruntime (ONNX exports) and torch (TorchScript exports only) are imported when first needed,
so the runtime imports only numpy; whatever either raises reaches the caller as one
:class:`BundleError` line.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ._errors import BundleError, OptionError

__all__ = ["INSTALL_HINT", "Graph", "OnFirstUse", "onnx_loader", "session_options",
           "torchscript_loader"]

INSTALL_HINT = "pip install pteenet[onnx]"
_MAX_THREADS = 1024  # pteenet.choices.MAX_THREADS (this package must run alone)

Graph = Callable[..., tuple[np.ndarray, ...]]  # arrays in, in the graph's input order


class OnFirstUse:
    """A graph loaded when first run: the batch-1 graph holds every weight a second time, and a
    caller who only sends batches should not pay for it in memory."""

    def __init__(self, load: Callable[[], Graph]) -> None:
        self._load, self.graph = load, None

    def __call__(self, *xs: np.ndarray) -> tuple[np.ndarray, ...]:
        if self.graph is None:
            self.graph = self._load()
        return self.graph(*xs)


@contextlib.contextmanager
def _graph_errors(path: Path, what: str) -> Iterator[None]:
    """onnxruntime and torch raise many types; the caller gets one BundleError line."""
    try:
        yield
    except BundleError:
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise BundleError(f"cannot {what} graph {path} ({type(e).__name__}: {first}); run "
                          f"`pteenet export` again") from e


def onnx_loader(providers: Sequence[str] | None, threads: int | None = None,
                 spin: bool = False) -> Callable[[Path], Graph]:
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise OptionError(f"running an ONNX export needs onnxruntime: {INSTALL_HINT}") from e
    chosen = list(providers) if providers else ["CPUExecutionProvider"]
    opts = session_options(threads, spin=spin)

    def load(path: Path) -> Graph:
        with _graph_errors(path, "load"):
            sess = ort.InferenceSession(str(path), opts, providers=chosen)
            names = [i.name for i in sess.get_inputs()]

        def run(*xs: np.ndarray) -> tuple[np.ndarray, ...]:
            with _graph_errors(path, "run"):
                return tuple(sess.run(None, dict(zip(names, xs))))

        return run

    return load


def session_options(threads: int | None = None, spin: bool = False) -> Any:
    """onnxruntime options for one graph of a cascade (or of a backbone timed against one).

    Spinning is off for the pieces: a cascade runs one session per segment and branch, and
    each session's idle workers would otherwise spin after their run and take the cores from
    the next session. A graph run alone, such as the batch-1 cascade, keeps onnxruntime's
    default (``spin``): without it every parallel operator waits for a sleeping worker to wake
    (both measured in ``benchmarks/results/design-timings.md``).
    """
    import onnxruntime as ort
    if threads is not None and not 1 <= threads <= _MAX_THREADS:
        raise OptionError(f"threads must lie in 1..{_MAX_THREADS}, got {str(threads)[:24]}")
    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = threads
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def torchscript_loader() -> Callable[[Path], Graph]:
    try:
        import torch
    except ImportError as e:
        raise OptionError("running a TorchScript export needs torch: pip install torch") from e

    def load(path: Path) -> Graph:
        with warnings.catch_warnings(), _graph_errors(path, "load"):
            warnings.simplefilter("ignore", FutureWarning)  # torch >= 2.10: TorchScript
            module = torch.jit.load(str(path), map_location="cpu").eval()  # is deprecated

        def run(*xs: np.ndarray) -> tuple[np.ndarray, ...]:
            # torch.from_numpy warns on read-only arrays
            ts = [torch.from_numpy(x if x.flags.writeable else x.copy()) for x in xs]
            with torch.inference_mode(), _graph_errors(path, "run"):
                out = module(*ts)
            outs = out if isinstance(out, tuple) else (out,)
            return tuple(o.contiguous().numpy() for o in outs)

        return run

    return load
