"""Vision-to-language projector: LLaVA's ``mlp2x_gelu``, with optional token pooling.

``Linear(D_v, D) -> GELU -> Linear(D, D)`` maps each vision feature to one language-model
embedding (LLaVA-1.5, LLaDA-V, LaViDa).  Token count is the main cost of an image in a
diffusion LM (every denoising step attends over it), so ``pool`` can average-pool the square
patch grid first, e.g. ``pool=2``: a 24x24 grid (576 tokens) becomes 12x12 (144).  Prefix
tokens (a CLS kept by ``select="cls_patch"``) are passed through unpooled.

Pooling happens *before* the MLP (on vision features, as LLaVA-NeXT / LaViDa do), so the
projector's parameter count does not depend on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ProjectorConfig", "Projector", "build_projector"]


@dataclass
class ProjectorConfig:
    """``vision_dim`` -> ``hidden_size``; ``pool`` x ``pool`` average pooling of the patch grid."""

    vision_dim: int = 32
    hidden_size: int = 64
    kind: Literal["mlp2x_gelu", "linear"] = "mlp2x_gelu"
    pool: int = 1  # 1 = no pooling; k = k x k average pool (grid side must be divisible by k)
    pool_mode: Literal["avg", "max"] = "avg"
    num_prefix_tokens: int = 0  # leading tokens (CLS) excluded from pooling

    def validate(self) -> None:
        if self.vision_dim <= 0 or self.hidden_size <= 0:
            raise ValueError("vision_dim and hidden_size must be positive")
        if self.pool < 1:
            raise ValueError(f"pool must be >= 1, got {self.pool}")
        if self.num_prefix_tokens < 0:
            raise ValueError("num_prefix_tokens must be >= 0")

    def num_output_tokens(self, num_input_tokens: int) -> int:
        """Tokens out for ``num_input_tokens`` in (prefix + square grid)."""
        grid = num_input_tokens - self.num_prefix_tokens
        side = math.isqrt(grid)
        if side * side != grid:
            raise ValueError(f"{grid} patch tokens do not form a square grid")
        if self.pool == 1:
            return num_input_tokens
        if side % self.pool:
            raise ValueError(f"grid side {side} is not divisible by pool={self.pool}")
        return self.num_prefix_tokens + (side // self.pool) ** 2


class Projector(nn.Module):
    """(N, P, D_v) vision features -> (N, P', D) language embeddings."""

    def __init__(self, config: ProjectorConfig):
        super().__init__()
        config.validate()
        self.config = config
        if config.kind == "mlp2x_gelu":
            self.mlp = nn.Sequential(
                nn.Linear(config.vision_dim, config.hidden_size),
                nn.GELU(),
                nn.Linear(config.hidden_size, config.hidden_size),
            )
        else:
            self.mlp = nn.Linear(config.vision_dim, config.hidden_size)

    def pool_tokens(self, features: torch.Tensor) -> torch.Tensor:
        """(N, prefix + s*s, D_v) -> (N, prefix + (s/k)^2, D_v), row-major grid order kept."""
        k = self.config.pool
        if k == 1:
            return features
        n_pre = self.config.num_prefix_tokens
        prefix, grid = features[:, :n_pre], features[:, n_pre:]
        n, p, d = grid.shape
        self.config.num_output_tokens(features.shape[1])  # validates the grid
        side = math.isqrt(p)
        x = grid.transpose(1, 2).reshape(n, d, side, side)  # (N, D_v, s, s)
        x = F.avg_pool2d(x, k) if self.config.pool_mode == "avg" else F.max_pool2d(x, k)  # (N, D_v, s/k, s/k)
        x = x.flatten(2).transpose(1, 2)  # (N, (s/k)^2, D_v)
        return torch.cat([prefix, x], dim=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.pool_tokens(features))  # (N, P', D)


def build_projector(config: ProjectorConfig) -> Projector:
    return Projector(config)
