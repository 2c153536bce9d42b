"""Resuming an interrupted attach: the training state saved after every epoch or branch."""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import torch
from torch import Tensor

from pteenet.cascade._model import EarlyExitModel
from pteenet.errors import BundleError, OptionError
from pteenet.storage import atomic_path
from pteenet.training._config import TrainReport
from pteenet.training._distributed import is_main

__all__ = ["Resume"]


class Resume:
    """Training state saved after every epoch (every branch when boosted), so an interrupted
    attach can continue.

    The file holds only tensors and plain values (loaded with ``weights_only=True``) and is
    written atomically; ``key`` fingerprints the run so a state is never applied to another one.
    Under several processes rank 0 writes it and every rank reads it: all ranks hold the same
    branches, optimiser and sample order, and boosted survivors are saved in the global order.
    ``done`` says what the file holds (``epoch 3``), for the message of an interrupted run.
    """

    def __init__(self, path: str | os.PathLike, key: str) -> None:
        self.path, self.key = Path(path), key
        self.done: str | None = None

    def _read(self) -> dict | None:
        if not self.path.is_file():
            return None
        try:
            with warnings.catch_warnings():  # "Detected pickle protocol 4": our line says
                warnings.simplefilter("ignore")  # enough, on the one line stderr gets
                state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # an input file, like the bundle beside it: exit 3, not 5
            raise BundleError(f"resume state {self.path} is unreadable ({_reason(e)}); delete "
                              f"it and start again without `resume`") from e
        if not isinstance(state, dict) or state.get("key") != self.key:
            raise OptionError(f"resume state {self.path} belongs to a different attach (other "
                              f"model, data or settings); delete it or drop `resume`")
        return state

    def _write(self, state: dict, done: str) -> None:
        if is_main():
            with atomic_path(self.path) as tmp:
                torch.save({"key": self.key, **state}, tmp)
        self.done = done

    def load(self, model: EarlyExitModel, opt: torch.optim.Optimizer, gen: torch.Generator,
             report: TrainReport) -> int:
        """Restore the last finished epoch; return the epoch to start from."""
        state = self._read()
        if state is None:
            return 0
        model.branches.load_state_dict(state["branches"])
        opt.load_state_dict(state["optim"])
        gen.set_state(state["gen"])
        report.losses = list(state["losses"])
        self.done = f"epoch {int(state['epoch']) + 1}"
        return int(state["epoch"]) + 1

    def save(self, epoch: int, model: EarlyExitModel, opt: torch.optim.Optimizer,
             gen: torch.Generator, report: TrainReport) -> None:
        self._write({"epoch": epoch, "branches": model.branches.state_dict(),
                     "optim": opt.state_dict(), "gen": gen.get_state(),
                     "losses": report.losses}, f"epoch {epoch + 1}")

    def load_stage(self, model: EarlyExitModel, gen: torch.Generator, report: TrainReport
                   ) -> tuple[int, Tensor, Tensor, Tensor] | None:
        """Boosted mode: restore the branches finished so far; return the next branch, the
        thresholds so far and the survivors' weights (train in the global order, held-out)."""
        state = self._read()
        if state is None:
            return None
        if "stage" not in state:
            raise OptionError(f"resume state {self.path} belongs to a different attach (other "
                              f"model, data or settings); delete it or drop `resume`")
        model.branches.load_state_dict(state["branches"])
        gen.set_state(state["gen"])
        report.losses, report.survivors = list(state["losses"]), list(state["survivors"])
        self.done = f"branch {int(state['stage']) + 1}"
        return int(state["stage"]) + 1, state["thr"], state["w_train"], state["w_held"]

    def save_stage(self, stage: int, model: EarlyExitModel, gen: torch.Generator,
                   report: TrainReport, thr: Tensor, w_train: Tensor, w_held: Tensor) -> None:
        self._write({"stage": stage, "branches": model.branches.state_dict(),
                     "gen": gen.get_state(), "losses": report.losses,
                     "survivors": report.survivors, "thr": thr, "w_train": w_train,
                     "w_held": w_held}, f"branch {stage + 1}")


def _reason(e: Exception) -> str:
    """Why torch could not load the state, without torch's advice to load it with
    ``weights_only=False``: that is the unsafe path, which pteenet never takes."""
    text = str(e)
    found = re.search(r"WeightsUnpickler error: \s*(\S[^\n]*)", text)
    first = found.group(1) if found else (text.strip().splitlines() or [type(e).__name__])[0]
    if "weights_only" in first:
        first = "it holds more than tensors and plain values"
    return first.split(". ")[0][:160]  # the cause, not what follows it
