"""Optimiser construction: what trains, at which LR, with which weight decay, on which schedule.

Three decisions live here and nowhere else:

1. **What trains** (``apply_trainable``).  ``trainable=["projector"]`` freezes every parameter
   whose name does not start with one of the prefixes (LLaVA stage 1: "projector only").  An empty
   list leaves ``requires_grad`` exactly as the model set it (a model may freeze its own VQ tokenizer).
   A prefix that matches no parameter is an error: a typo must not silently train nothing.

2. **Parameter groups** (``build_param_groups``).  ``param_groups={"vision_tower": 2e-6}`` gives
   the parameters under a prefix their own peak LR (LLaDA-V stage 2: LLM 1e-5, vision tower 2e-6).
   A value is either a float (absolute peak LR) or a ``ParamGroup`` with ``lr`` (absolute) *or*
   ``lr_scale`` (multiplier of ``TrainConfig.lr``) and an optional ``weight_decay``.  When several
   prefixes match one parameter, the longest wins.

3. **Decoupled weight decay** (AdamW).  No decay on parameters with fewer than two dimensions
   (biases, LayerNorm/RMSNorm gains) nor on embedding tables (``nn.Embedding`` weights, and any
   parameter tied to one, e.g. a tied LM head): decaying them pulls norms and rare-token embeddings
   towards zero without any regularisation benefit (GPT-2/nanoGPT/LLaMA practice).

Prefix matching is component-aware: ``"vision_tower"`` matches ``vision_tower.blocks.0.w`` and
``vision_tower`` itself but not ``vision_tower2.w``.

The schedule (``warmup_cosine``) is linear warmup to the peak LR then cosine decay to
``min_lr_ratio × peak``; every group follows the same shape scaled by its own peak, so a separate
vision-tower LR decays in step with the rest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

__all__ = [
    "ParamGroup",
    "matches_prefix",
    "apply_trainable",
    "no_decay_param_ids",
    "build_param_groups",
    "build_optimizer",
    "adamw_kernel",
    "OPTIMIZER_IMPLS",
    "WarmupCosine",
    "build_scheduler",
]


@dataclass
class ParamGroup:
    """Optimiser settings for the parameters under one name prefix.

    Exactly one of ``lr`` (absolute peak LR) and ``lr_scale`` (multiplier of ``TrainConfig.lr``);
    ``weight_decay`` overrides ``TrainConfig.weight_decay`` for the decayed parameters of the group.
    """

    lr: float | None = None
    lr_scale: float | None = None
    weight_decay: float | None = None

    def validate(self) -> None:
        if (self.lr is None) == (self.lr_scale is None):
            raise ValueError("param group: give exactly one of 'lr' (absolute) and 'lr_scale' (multiplier)")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"param group 'lr' must be > 0, got {self.lr}")
        if self.lr_scale is not None and self.lr_scale <= 0:
            raise ValueError(f"param group 'lr_scale' must be > 0, got {self.lr_scale}")
        if self.weight_decay is not None and self.weight_decay < 0:
            raise ValueError(f"param group 'weight_decay' must be >= 0, got {self.weight_decay}")

    def peak_lr(self, base_lr: float) -> float:
        return float(self.lr) if self.lr is not None else base_lr * float(self.lr_scale)


def matches_prefix(name: str, prefix: str) -> bool:
    """Component-aware prefix test: ``a.b`` matches ``a.b`` and ``a.b.c`` but not ``a.bc``."""
    prefix = prefix.rstrip(".")
    return name == prefix or name.startswith(prefix + ".")


def _top_level_names(model: nn.Module) -> list[str]:
    return sorted({n.split(".")[0] for n, _ in model.named_parameters()})


def apply_trainable(model: nn.Module, prefixes: Iterable[str]) -> list[str]:
    """Freeze every parameter not under one of ``prefixes``; return the trainable names.

    Empty ``prefixes``: ``requires_grad`` is left as the model set it.
    Raises ``ValueError`` naming a prefix that matches no parameter, or if nothing is trainable.
    """
    prefixes = [p for p in prefixes]
    named = list(model.named_parameters())
    if prefixes:
        for p in prefixes:
            if not any(matches_prefix(n, p) for n, _ in named):
                raise ValueError(
                    f"trainable: prefix '{p}' matches no parameter "
                    f"(top-level modules: {', '.join(_top_level_names(model))})"
                )
        for n, param in named:
            param.requires_grad_(any(matches_prefix(n, p) for p in prefixes))
    trainable = [n for n, param in named if param.requires_grad]
    if not trainable:
        raise ValueError("trainable: no parameter requires grad; nothing to train")
    return trainable


def no_decay_param_ids(model: nn.Module) -> set[int]:
    """ids of parameters exempt from weight decay: ndim < 2 and embedding tables (incl. tied)."""
    ids = {id(p) for p in model.parameters() if p.ndim < 2}
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            ids.add(id(module.weight))
    return ids


def _normalise_groups(param_groups: dict | None) -> dict[str, ParamGroup]:
    out: dict[str, ParamGroup] = {}
    for prefix, spec in (param_groups or {}).items():
        if isinstance(spec, ParamGroup):
            group = spec
        elif isinstance(spec, (int, float)) and not isinstance(spec, bool):
            group = ParamGroup(lr=float(spec))
        elif isinstance(spec, dict):
            group = ParamGroup(**spec)
        else:
            raise ValueError(f"param_groups.{prefix}: expected an LR (float) or a mapping, got {spec!r}")
        try:
            group.validate()
        except ValueError as e:
            raise ValueError(f"param_groups.{prefix}: {e}") from None
        out[prefix] = group
    return out


def build_param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    param_groups: dict | None = None,
) -> list[dict]:
    """Optimiser param-group dicts: (prefix group or ``default``) × (``decay`` | ``no_decay``).

    Only parameters with ``requires_grad`` are included; tied parameters appear once.
    Each dict carries ``name`` (e.g. ``"vision_tower/no_decay"``), ``params``, ``lr`` (the peak),
    ``weight_decay`` and ``param_names`` (for logging and tests).
    """
    groups = _normalise_groups(param_groups)
    named_all = list(model.named_parameters())
    for prefix in groups:
        if not any(matches_prefix(n, prefix) for n, _ in named_all):
            raise ValueError(
                f"param_groups: prefix '{prefix}' matches no parameter "
                f"(top-level modules: {', '.join(_top_level_names(model))})"
            )
    no_decay = no_decay_param_ids(model)
    buckets: dict[str, dict] = {}
    seen: set[int] = set()
    for name, param in named_all:  # named_parameters() already skips tied duplicates
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        matching = [p for p in groups if matches_prefix(name, p)]
        prefix = max(matching, key=len) if matching else None
        group = groups.get(prefix) if prefix else None
        peak = group.peak_lr(lr) if group else lr
        wd = group.weight_decay if (group and group.weight_decay is not None) else weight_decay
        kind = "no_decay" if id(param) in no_decay else "decay"
        key = f"{prefix or 'default'}/{kind}"
        bucket = buckets.setdefault(
            key,
            {"name": key, "params": [], "param_names": [], "lr": peak,
             "weight_decay": 0.0 if kind == "no_decay" else wd},
        )
        bucket["params"].append(param)
        bucket["param_names"].append(name)
    if not buckets:
        raise ValueError("no trainable parameters: every parameter has requires_grad=False")
    return list(buckets.values())


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
    param_groups: dict | None = None,
    implementation: str = "auto",
) -> torch.optim.AdamW:
    """AdamW (decoupled weight decay) over ``build_param_groups``; ``implementation`` in ``OPTIMIZER_IMPLS``
    (fused: one kernel over all tensors, 3.7x faster than the per-tensor loop for the quickstart's
    mini model on one CPU thread; results equal to ~1e-7)."""
    groups = build_param_groups(model, lr, weight_decay, param_groups)
    # ``param_names`` is bookkeeping, not an AdamW option; keep it out of the state dict.
    torch_groups = [{k: v for k, v in g.items() if k != "param_names"} for g in groups]
    impl = adamw_kernel([p for g in groups for p in g["params"]], implementation)
    return torch.optim.AdamW(torch_groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, **impl)


#: ``train.optimizer_impl`` values: torch's fused AdamW kernel, its multi-tensor (foreach) loop, or the
#: one-tensor-at-a-time reference loop.  ``auto``: fused when every parameter is a floating tensor on
#: a device with a fused kernel (CPU, CUDA), else torch's own default.
OPTIMIZER_IMPLS = ("auto", "fused", "foreach", "single")


def adamw_kernel(params: list[torch.Tensor], implementation: str) -> dict:
    """The ``torch.optim.AdamW`` keyword (``fused`` / ``foreach``) for ``implementation`` over ``params``."""
    if implementation not in OPTIMIZER_IMPLS:
        raise ValueError(f"optimizer_impl must be one of {OPTIMIZER_IMPLS}, got {implementation!r}")
    if implementation == "single":
        return {"foreach": False}
    if implementation == "foreach":
        return {"foreach": True}
    fusable = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    if implementation == "fused":
        if not fusable:
            bad = sorted({f"{p.device.type}/{p.dtype}" for p in params})
            raise ValueError(f"optimizer_impl=fused needs floating-point parameters on CPU or CUDA, got {bad}")
        return {"fused": True}
    return {"fused": True} if fusable else {}


class WarmupCosine:
    """LR multiplier for optimiser step ``s`` (0-based): linear warmup, then cosine to ``min_ratio``.

    ``f(s) = (s + 1) / warmup``                                         for s < warmup
    ``f(s) = r + (1 - r) · ½ (1 + cos(π · (s − warmup) / (total − warmup)))``  afterwards

    A plain object (not a lambda) so ``LambdaLR.state_dict()`` records its fields and the
    scheduler state round-trips through ``torch.load(weights_only=True)``.
    """

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float) -> None:
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.min_ratio = float(min_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupCosine(warmup_steps, total_steps, min_lr_ratio)
    )
