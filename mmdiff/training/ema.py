"""Exponential moving average of model weights.

``shadow ← d·shadow + (1 − d)·θ`` after every optimiser step, with the usual warm start
``d = min(decay, (1 + n) / (10 + n))`` (n = updates so far) so the average is not dominated by
the random initialisation during the first few hundred steps.

Design notes
* Only parameters that train are tracked (a frozen vision tower never changes, so its EMA *is*
  the parameter); ``state_dict_for(model)`` fills the untracked entries from the model so the
  exported EMA weights are always a complete, loadable state dict.
* Shadows are kept in float32 whatever the training precision, on the parameter's device.
* Under DDP all replicas hold identical parameters, hence identical EMAs; rank 0 saves it.
* ``swapped(model)`` temporarily loads the EMA weights into the model (evaluation, sampling)
  and restores the training weights afterwards.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

__all__ = ["EMA"]


class EMA:
    def __init__(self, model: nn.Module, decay: float, warmup: bool = True) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.warmup = warmup
        self.num_updates = 0
        self.shadow: dict[str, torch.Tensor] = {
            name: p.detach().to(torch.float32).clone()
            for name, p in model.named_parameters()
            if p.requires_grad
        }

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        n = self.num_updates
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        params = dict(model.named_parameters())
        for name, s in self.shadow.items():
            s.mul_(d).add_(params[name].detach().to(torch.float32), alpha=1.0 - d)  # s = d·s + (1−d)·θ
        self.num_updates += 1

    def state_dict(self) -> dict:
        return {"shadow": self.shadow, "num_updates": self.num_updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        shadow = state["shadow"]
        missing = sorted(set(self.shadow) - set(shadow))
        unexpected = sorted(set(shadow) - set(self.shadow))
        if missing or unexpected:
            raise KeyError(
                f"EMA state does not match the trainable parameters: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
        for name, t in shadow.items():
            if t.shape != self.shadow[name].shape:
                raise ValueError(f"EMA entry '{name}': shape {tuple(t.shape)} != {tuple(self.shadow[name].shape)}")
            self.shadow[name].copy_(t)
        self.num_updates = int(state.get("num_updates", 0))

    @torch.no_grad()
    def state_dict_for(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """A complete model state dict with EMA values for the tracked parameters."""
        out = {}
        for name, t in model.state_dict().items():
            out[name] = self.shadow[name].to(t.dtype) if name in self.shadow else t.detach().clone()
        return out

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        for name, s in self.shadow.items():
            params[name].copy_(s.to(params[name].dtype))

    @contextlib.contextmanager
    def swapped(self, model: nn.Module) -> Iterator[nn.Module]:
        """``with ema.swapped(model): evaluate(model)`` — EMA weights inside, training weights after."""
        params = dict(model.named_parameters())
        backup = {name: params[name].detach().clone() for name in self.shadow}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, t in backup.items():
                    params[name].copy_(t)
