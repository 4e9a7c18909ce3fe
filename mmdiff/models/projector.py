"""Vision-to-language projector: LLaVA's ``mlp2x_gelu``, with optional token pooling.

``Linear(D_v, D) -> GELU -> Linear(D, D)`` maps each vision feature to one language-model
embedding (LLaVA-1.5, LLaDA-V, LaViDa).  Token count is the main cost of an image in a
diffusion LM (every denoising step attends over it), so ``pool`` can average-pool the square
patch grid first, e.g. ``pool=2``: a 24x24 grid (576 tokens) becomes 12x12 (144).  Prefix
tokens (a CLS kept by ``select="cls_patch"``) are passed through unpooled.

Pooling happens *before* the MLP (on vision features, as LLaVA-NeXT / LaViDa do), so the
projector's parameter count does not depend on it -- except ``pool_mode="concat"``
(space-to-depth, InternVL's / Idefics3's pixel shuffle): each output token is the concatenation
of its k x k patches' features (D_v * k^2 wide), so fewer tokens lose no detail; the MLP's input
grows accordingly.

``pool_stride`` below ``pool`` makes the windows overlap (a k x k window every ``pool_stride``
patches, like a strided convolution's receptive fields; Honeybee's and MobileVLM's projectors also
mix neighbouring patches): with ``pool=2, pool_stride=1, pool_mode="concat"`` a 4x4 grid becomes 3x3
tokens, each the concatenation of a 2x2 neighbourhood -- on a 32-px Shapes scene with 8-px patches,
token k holds every patch that overlaps grid cell k (cells are 10.7 px and never fall on the
patch grid), so one token carries one object's fragments together.
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
    pool_mode: Literal["avg", "max", "concat"] = "avg"
    pool_stride: int = 0  # 0 = pool (windows side by side); 1 <= stride < pool: overlapping windows
    num_prefix_tokens: int = 0  # leading tokens (CLS) excluded from pooling
    # A learned embedding per output token position, added to the projected features.  With RoPE
    # only, an image token's *value* carries no position, so "where is the red circle?" can only
    # be answered once the tower's own position signal survives; this hands it over explicitly.
    position_embedding: bool = False
    num_tokens: int = 0  # output tokens per image; set by the model that owns the projector
    # > 0: each output token is RMS-normalised to this per-element RMS (no learned scale), e.g. the
    # language model's embedding init std.  Raw tower features are ~100x larger than fresh token
    # embeddings; in a pre-norm transformer that makes their gradients ~100x smaller (the norm
    # divides by them) and the layers cannot update those positions, so a from-scratch model
    # learns to read images very slowly.
    output_rms: float = 0.0
    # Whiten the tower features before the MLP: x -> (x - mean) @ W with W = C^-1/2 (ZCA, eigenvalues
    # floored at WHITEN_EPS x their mean), fitted once on a sample of training images
    # (``fit_whitening``; ``mmdiff.training.recipe`` does it when a fresh model is built) and kept as
    # buffers in the weights.  A tiny tower's features are ill-conditioned: one direction (object vs
    # background) holds ~40-70% of the variance and colour, shape and size sit in small ones, so
    # gradient descent reads them late.  2,000 caption steps from stage 1, same tower: colour of a
    # caption filled in from the image at NLL 0.69 instead of 1.43, caption colours 0.67 instead of
    # 0.42 (BENCHMARKS.md, session 15).  The statistics stay fixed while a tower trains on.
    whiten_inputs: bool = False

    def validate(self) -> None:
        if self.vision_dim <= 0 or self.hidden_size <= 0:
            raise ValueError("vision_dim and hidden_size must be positive")
        if self.pool < 1:
            raise ValueError(f"pool must be >= 1, got {self.pool}")
        if self.pool_mode not in ("avg", "max", "concat"):
            raise ValueError(f"pool_mode must be 'avg', 'max' or 'concat', got {self.pool_mode!r}")
        if self.pool_mode == "concat" and self.pool > 1 and self.num_prefix_tokens:
            raise ValueError("pool_mode 'concat' cannot widen prefix (CLS) tokens; use select='patch' "
                             "or another pool_mode")
        if self.pool_stride < 0 or self.pool_stride > self.pool:
            raise ValueError(f"pool_stride must be 0 (= pool) or 1..pool={self.pool}, got {self.pool_stride}")
        if self.num_prefix_tokens < 0:
            raise ValueError("num_prefix_tokens must be >= 0")
        if self.output_rms < 0:
            raise ValueError(f"output_rms must be >= 0, got {self.output_rms}")
        if self.num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {self.num_tokens}")

    def num_output_tokens(self, num_input_tokens: int) -> int:
        """Tokens out for ``num_input_tokens`` in (prefix + square grid)."""
        grid = num_input_tokens - self.num_prefix_tokens
        side = math.isqrt(grid)
        if side * side != grid:
            raise ValueError(f"{grid} patch tokens do not form a square grid")
        if self.pool == 1:
            return num_input_tokens
        stride = self.stride
        if side < self.pool or (side - self.pool) % stride:
            raise ValueError(f"grid side {side} is not covered by windows of pool={self.pool} every "
                             f"{stride} patches ((side - pool) must be a multiple of the stride)")
        return self.num_prefix_tokens + ((side - self.pool) // stride + 1) ** 2

    @property
    def stride(self) -> int:
        return self.pool_stride or self.pool


class Projector(nn.Module):
    """(N, P, D_v) vision features -> (N, P', D) language embeddings."""

    def __init__(self, config: ProjectorConfig):
        super().__init__()
        config.validate()
        self.config = config
        d_in = config.vision_dim * (config.pool ** 2 if config.pool_mode == "concat" else 1)
        if config.kind == "mlp2x_gelu":
            self.mlp = nn.Sequential(
                nn.Linear(d_in, config.hidden_size),
                nn.GELU(),
                nn.Linear(config.hidden_size, config.hidden_size),
            )
        else:
            self.mlp = nn.Linear(d_in, config.hidden_size)
        if config.whiten_inputs:  # identity until fitted; persistent: saved with the weights
            self.register_buffer("input_mean", torch.zeros(config.vision_dim))
            self.register_buffer("input_whitening", torch.eye(config.vision_dim))
        self.position = None
        if config.position_embedding and config.num_tokens <= 0:
            raise ValueError("projector position_embedding needs num_tokens (output tokens per image) > 0")
        if config.position_embedding:  # half the normalised features' RMS, or about that of fresh projections
            scale = 0.5 * config.output_rms if config.output_rms > 0 else 0.5
            self.position = nn.Parameter(torch.randn(config.num_tokens, config.hidden_size) * scale)

    def pool_tokens(self, features: torch.Tensor) -> torch.Tensor:
        """(N, prefix + s*s, D_v) -> (N, prefix + s'^2, D_v) (D_v * k^2 for ``concat``), s' = (s - k) / stride + 1
        (s / k side by side), row-major grid order kept."""
        k = self.config.pool
        if k == 1:
            return features
        n_pre = self.config.num_prefix_tokens
        prefix, grid = features[:, :n_pre], features[:, n_pre:]
        n, p, d = grid.shape
        self.config.num_output_tokens(features.shape[1])  # validates the grid
        side = math.isqrt(p)
        x = grid.transpose(1, 2).reshape(n, d, side, side)  # (N, D_v, s, s)
        mode, stride = self.config.pool_mode, self.config.stride
        if mode == "concat":
            # (N, D_v*k*k, s'^2): channel c*k*k + i*k + j = window patch (i, j), feature c (= pixel_unshuffle's
            # order when the windows do not overlap)
            x = F.unfold(x, kernel_size=k, stride=stride)
        else:
            x = F.avg_pool2d(x, k, stride) if mode == "avg" else F.max_pool2d(x, k, stride)  # (N, D_v, s', s')
            x = x.flatten(2)
        x = x.transpose(1, 2)  # (N, s'^2, D_v or D_v*k*k)
        return torch.cat([prefix, x], dim=1) if n_pre else x

    WHITEN_EPS = 1e-2

    @torch.no_grad()
    def fit_whitening(self, features: torch.Tensor) -> dict:
        """Set the input whitening from tower features (..., D_v) of sample images (every token counts).

        Returns the spectrum's summary: the largest eigenvalue's share of the variance and the
        condition number before whitening.
        """
        if not self.config.whiten_inputs:
            raise ValueError("fit_whitening: the projector was built with whiten_inputs=False")
        x = features.reshape(-1, features.shape[-1]).double()
        if x.shape[-1] != self.config.vision_dim:
            raise ValueError(f"fit_whitening: features have {x.shape[-1]} channels, the projector expects "
                             f"{self.config.vision_dim}")
        if x.shape[0] < 2 * x.shape[1]:
            raise ValueError(f"fit_whitening: {x.shape[0]} feature vectors for {x.shape[1]} channels; "
                             f"need at least {2 * x.shape[1]}")
        mean = x.mean(0)
        eig, vec = torch.linalg.eigh(torch.cov(x.T))  # torch.cov centres the columns itself
        eig = eig.clamp_min(0)
        floor = self.WHITEN_EPS * eig.mean()
        w = vec @ torch.diag((eig + floor).rsqrt()) @ vec.T
        self.input_mean.copy_(mean.to(self.input_mean.dtype))
        self.input_whitening.copy_(w.to(self.input_whitening.dtype))
        return {"top_variance_share": float(eig[-1] / eig.sum()),
                "condition": float(eig[-1] / eig[0].clamp_min(1e-12)), "vectors": int(x.shape[0])}

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.config.whiten_inputs:
            features = (features - self.input_mean.to(features.dtype)) @ self.input_whitening.to(features.dtype)
        x = self.mlp(self.pool_tokens(features))  # (N, P', D)
        if self.config.output_rms > 0:
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.config.output_rms
        if self.position is not None:  # after the normalisation: the slot signal keeps its share
            if x.shape[1] != self.position.shape[0]:
                raise ValueError(f"projector has {self.position.shape[0]} position embeddings, got {x.shape[1]} tokens")
            x = x + self.position.to(x.dtype)
        return x


def build_projector(config: ProjectorConfig) -> Projector:
    return Projector(config)
