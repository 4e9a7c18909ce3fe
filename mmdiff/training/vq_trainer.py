"""Training the VQ image tokenizer (``mmdiff.models.vq.VQTokenizer``) on images.

The loss is the VQ-VAE one, written out here rather than taken from diffusers'
``VectorQuantizer`` (whose ``legacy`` loss swaps the codebook and commitment weights)::

    z   = E(x)                          # (N, D, h, w), on the unit sphere if l2_normalize
    e   = nearest code of z             # (N, D, h, w)
    z_q = z + sg(e - z)                 # straight-through estimator
    L   = rec(D(z_q), x) + ||sg(z) - e||^2 + beta * ||z - sg(e)||^2
                           ^ codebook term (dropped with EMA codes)   ^ commitment

What keeps the codebook alive (small codebooks on flat-colour scenes die easily):

* ``codebook_update = "ema"``: codes are exponential moving averages of the latents assigned
  to them (VQ-VAE-2), no codebook gradient;
* ``model.l2_normalize``: cosine lookup, latents and codes on the unit sphere (ViT-VQGAN);
* low code dimension (``model.vq_embed_dim``), a factorised lookup space;
* ``dead_code_every``: every N steps, codes picked fewer than ``dead_code_threshold`` times
  since the last check are restarted at latents of the current batch: uniformly drawn, or with
  ``dead_code_sampling = "far"`` drawn like k-means++ seeds (probability proportional to the squared
  distance to the nearest live code), so restarts go where the codebook is thin.

The trainer takes images as a tensor (N, 3, H, W) (float in [0, 1] or uint8) or any iterable of
such batches / single images; ``load_shard_images`` reads webdataset shards (``png``).  Held-out
metrics: PSNR, codebook usage (unique codes, perplexity) and, for flat-palette data such as the
Shapes world, the fraction of pixels (and of whole images) whose nearest palette colour changes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal

import torch
import torch.nn.functional as F

from mmdiff.models.vq import VQConfig, VQTokenizer
from mmdiff.training.optim import adamw_kernel

__all__ = [
    "VQTrainConfig",
    "VQRecipe",
    "VQTrainer",
    "evaluate_vq",
    "load_shard_images",
    "train_vq",
    "run_train_vq",
    "SHAPES_PALETTE",
]

# Shapes world palette (../shared/WORLD.md) with the black background first.
SHAPES_PALETTE: list[list[int]] = [
    [0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 0, 255], [0, 255, 255],
]


@dataclass
class VQTrainConfig:
    """Optimisation and codebook-health options for VQ training."""

    steps: int = 600
    batch_size: int = 32
    lr: float = 2e-3
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = 20
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # 0 disables
    recon_loss: Literal["mse", "l1"] = "mse"
    beta: float = 0.25  # commitment weight
    codebook_update: Literal["grad", "ema"] = "ema"
    ema_decay: float = 0.95
    dead_code_every: int = 25  # steps between dead-code restarts; 0 disables
    dead_code_threshold: int = 1  # a code used fewer times than this since the last check is dead
    dead_code_until: float = 0.8  # stop restarting after this fraction of steps (let codes settle)
    # where a dead code restarts: "uniform" = a random latent of the batch; "far" = a latent drawn
    # with probability proportional to its squared distance to the nearest live code (k-means++
    # seeding), so codes go where the codebook is thin instead of onto the commonest latent (in a
    # Shapes batch ~60% of cells are empty background, and uniform restarts land there).
    dead_code_sampling: Literal["uniform", "far"] = "uniform"
    max_minutes: float = 0.0  # wall-clock budget; 0 = none. The LR schedule follows whichever of
    # steps / time runs out first, so a time-boxed run still anneals.
    num_threads: int = 0  # torch.set_num_threads during training; 0 leaves it alone
    # Plain-autoencoder warm-up: for this fraction of the run the decoder reads the continuous
    # latents (no quantisation, no commitment); then every code restarts at a latent of the
    # current batch.  Deep encoders (downsample 8-16) start out mapping every patch to nearly the
    # same latent, so quantising from step 0 collapses onto one code that decodes to background.
    ae_warmup: float = 0.0
    # How the codebook starts quantising (at step 0, or when the warm-up ends): "batch" = every
    # code restarts at a latent of the current batch (see dead_code_sampling); "kmeans" = k-means
    # over the latents of up to ``kmeans_images`` training images (k-means++ seeding on the
    # distinct latents, then ``kmeans_iters`` Lloyd steps).  A batch holds a few dozen distinct
    # patterns, so batch restarts leave rare ones (small objects) sharing a code with a common one;
    # k-means over the data gives every pattern its own code while K exceeds their number.
    codebook_init: Literal["batch", "kmeans"] = "batch"
    # Once the codebook starts quantising (the end of the warm-up, after the k-means init), freeze
    # the encoder and the codebook and train the decoder alone.  When many patterns are similar
    # (the Shapes world's cells: one shape at 4-9 jitter offsets), quantised training of encoder and
    # codebook merges them onto a few codes (k-means: 196 codes; 300 steps later: 34) and the
    # decoder paints their blurred average; frozen, every pattern keeps the code k-means gave it and
    # the decoder only has to learn what each code looks like.
    freeze_encoder: bool = False
    # Train on each batch's distinct tiles (tiled tokenizers, whose tiles are coded alone): a
    # Shapes batch is ~80% blank tiles, and the rare patterns (a small triangle at one offset)
    # are what a tokenizer must get exact.  Deduplicating weights every pattern of the batch once
    # and makes a step ~5x cheaper; metrics are still computed on whole images.
    unique_tiles: bool = False
    kmeans_images: int = 2000
    kmeans_iters: int = 10
    seed: int = 0
    log_every: int = 50
    eval_every: int = 0  # 0: evaluate only at the end
    eval_images: int = 256  # held out from the training images when no eval set is given
    eval_batch_size: int = 128
    max_train_images: int = 0  # 0: all
    # Train on random crops of this side (0 = whole images; a multiple of the downsample factor).
    # Encoder and decoder are convolutional, so crops teach the same local code<->patch mapping
    # at a fraction of the cost; metrics are always computed on whole images.
    crop_size: int = 0
    palette: list[list[int]] = field(default_factory=lambda: [list(c) for c in SHAPES_PALETTE])

    def validate(self) -> None:
        if self.steps <= 0 or self.batch_size <= 0 or self.eval_batch_size <= 0:
            raise ValueError("steps, batch_size and eval_batch_size must be positive")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.beta < 0 or self.warmup_steps < 0 or self.dead_code_every < 0:
            raise ValueError("beta, warmup_steps and dead_code_every must be >= 0")
        if not 0.0 <= self.dead_code_until <= 1.0:
            raise ValueError("dead_code_until must be in [0, 1]")
        if self.dead_code_sampling not in ("uniform", "far"):
            raise ValueError(f"dead_code_sampling must be 'uniform' or 'far', got {self.dead_code_sampling!r}")
        if self.codebook_init not in ("batch", "kmeans"):
            raise ValueError(f"codebook_init must be 'batch' or 'kmeans', got {self.codebook_init!r}")
        if self.kmeans_images < 1 or self.kmeans_iters < 0:
            raise ValueError("kmeans_images must be >= 1 and kmeans_iters >= 0")
        if not 0.0 <= self.ae_warmup < 1.0:
            raise ValueError(f"ae_warmup must be in [0, 1), got {self.ae_warmup}")
        if self.freeze_encoder and self.codebook_init != "kmeans":
            raise ValueError("freeze_encoder needs codebook_init: kmeans (a frozen codebook must start with one "
                             "code per pattern)")
        if self.crop_size < 0:
            raise ValueError(f"crop_size must be >= 0, got {self.crop_size}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError("min_lr_ratio must be in [0, 1]")
        for c in self.palette:
            if len(c) != 3 or not all(0 <= v <= 255 for v in c):
                raise ValueError(f"palette colours must be [r, g, b] in 0..255, got {c}")


@dataclass
class VQRecipe:
    """A VQ tokenizer recipe: a YAML file such as ``tokenizers/configs/vq-shapes-cells.yaml``."""

    model: VQConfig = field(default_factory=VQConfig)
    train: VQTrainConfig = field(default_factory=VQTrainConfig)

    def validate(self) -> None:
        self.model.validate()
        self.train.validate()
        if self.train.unique_tiles and not self.model.tile_size:
            raise ValueError("train.unique_tiles needs model.tile_size > 0 (tiles coded alone)")
        if self.model.cell_grid and 0 < self.train.crop_size < self.model.image_size:
            raise ValueError(f"train.crop_size={self.train.crop_size}: crops are not supported with "
                             f"model.cell_grid={self.model.cell_grid} (cells are laid out from whole images); "
                             "set crop_size: 0")


# ---------------------------------------------------------------------------------- data
def _to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] or float [0, 1] -> float32 [0, 1]."""
    if x.dtype == torch.uint8:
        return x.float() / 255.0
    return x.float()


def load_shard_images(
    data: str | Path | Iterable[str | Path], image_size: int | None = None, limit: int = 0
) -> torch.Tensor:
    """Read the ``png``/``jpg`` images of webdataset shards -> uint8 tensor (N, 3, H, W).

    ``data``: a directory of ``*.tar`` shards, one tar, or a list of them.  Images are
    converted to RGB and, if ``image_size`` is given and differs, resized (nearest, which keeps
    flat palette colours exact).
    """
    import numpy as np
    import webdataset as wds
    from PIL import Image

    from mmdiff.data.shards import list_shards

    shards = list_shards(data)
    out = []
    for sample in wds.WebDataset(shards, shardshuffle=False, empty_check=False).decode("pil"):
        img = next((sample[k] for k in ("png", "jpg", "jpeg", "webp") if k in sample), None)
        if img is None:
            continue
        img = img.convert("RGB")
        if image_size is not None and img.size != (image_size, image_size):
            img = img.resize((image_size, image_size), Image.NEAREST)
        out.append(torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1))
        if limit and len(out) >= limit:
            break
    if not out:
        raise ValueError(f"no images found in {shards}")
    return torch.stack(out)  # (N, 3, H, W) uint8


def _batches(images, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless stream of float batches (B, 3, H, W) in [0, 1].

    A tensor is sampled with reshuffling each epoch; an iterable is re-iterated each epoch and
    may yield batches (B, 3, H, W) or single images (3, H, W).
    """
    if isinstance(images, torch.Tensor):
        n = images.shape[0]
        while True:
            perm = torch.randperm(n, generator=generator)
            for i in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
                yield _to_float(images[perm[i : i + batch_size]])
    while True:
        buf: list[torch.Tensor] = []
        produced = False
        for item in images:
            item = item if isinstance(item, torch.Tensor) else torch.as_tensor(item)
            if item.dim() == 4:
                produced = True
                yield _to_float(item)
                continue
            buf.append(item)
            if len(buf) == batch_size:
                produced = True
                yield _to_float(torch.stack(buf))
                buf = []
        if buf:
            produced = True
            yield _to_float(torch.stack(buf))
        if not produced:
            raise ValueError("the image iterable is empty (or a one-shot iterator that is used up)")


# ---------------------------------------------------------------------------------- metrics
def _palette_labels(x: torch.Tensor, palette: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] -> index of the nearest palette colour (N, H, W)."""
    d = ((x.permute(0, 2, 3, 1)[..., None, :] - palette) ** 2).sum(-1)  # (N, H, W, C)
    return d.argmin(-1)


@torch.no_grad()
def evaluate_vq(
    tokenizer: VQTokenizer,
    images: torch.Tensor,
    batch_size: int = 128,
    palette: list[list[int]] | None = None,
) -> dict:
    """Held-out metrics of a tokenizer on images (N, 3, H, W) (uint8 or float in [0, 1]).

    psnr (dB, mean over images, peak 1.0), mse, codes_used (unique codes over all images),
    code_usage (codes_used / K), perplexity (exp of the code-histogram entropy) and, with a
    palette, palette_pixel_error (fraction of pixels whose nearest palette colour differs
    between image and reconstruction) and palette_exact (fraction of images with no such pixel).
    """
    was_training = tokenizer.training
    tokenizer.eval()
    k = tokenizer.codebook_size
    hist = torch.zeros(k, dtype=torch.long)
    psnrs, mses, pix_err, exact = [], [], [], []
    pal = torch.tensor(palette, dtype=torch.float32) / 255.0 if palette else None
    for i in range(0, images.shape[0], batch_size):
        x = _to_float(images[i : i + batch_size])
        codes = tokenizer.encode_to_codes(x)  # (B, h, w)
        recon = tokenizer.decode_codes(codes)  # (B, 3, H, W)
        hist += torch.bincount(codes.flatten(), minlength=k)
        mse = ((recon - x) ** 2).flatten(1).mean(1)  # (B,)
        mses.append(mse)
        psnrs.append(10.0 * torch.log10(1.0 / mse.clamp_min(1e-10)))
        if pal is not None:
            wrong = _palette_labels(recon, pal) != _palette_labels(x, pal)  # (B, H, W)
            pix_err.append(wrong.flatten(1).float().mean(1))
            exact.append((wrong.flatten(1).sum(1) == 0).float())
    tokenizer.train(was_training)
    p = hist.float() / hist.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    out = {
        "psnr": torch.cat(psnrs).mean().item(),
        "mse": torch.cat(mses).mean().item(),
        "codes_used": int((hist > 0).sum()),
        "code_usage": float((hist > 0).float().mean()),
        "perplexity": float(entropy.exp()),
        "num_images": int(images.shape[0]),
    }
    if pal is not None:
        out["palette_pixel_error"] = torch.cat(pix_err).mean().item()
        out["palette_exact"] = torch.cat(exact).mean().item()
    return out


def _far_picks(latents: torch.Tensor, live: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: ``n`` rows of ``latents`` (M, D), each drawn with probability proportional
    to its squared distance to the nearest of ``live`` (L, D) codes and of the rows already drawn.
    Once every latent sits on a code, further picks follow the distances to the live codes alone
    (duplicates go to the thinly covered latents), or are uniform if those are all zero too.
    """
    to_live = torch.cdist(latents, live).min(dim=1).values.square() if live.shape[0] else None  # (M,)
    d2, picks = to_live, []
    for _ in range(n):
        if d2 is not None and float(d2.sum()) > 0:
            j = int(torch.multinomial(d2, 1, generator=generator))
        elif to_live is not None and float(to_live.sum()) > 0:
            j = int(torch.multinomial(to_live, 1, generator=generator))
        else:  # nothing placed yet, or nothing left to prefer
            j = int(torch.randint(0, latents.shape[0], (1,), generator=generator))
        picks.append(j)
        dj = (latents - latents[j]).square().sum(-1)
        d2 = dj if d2 is None else torch.minimum(d2, dj)
    return torch.tensor(picks, dtype=torch.long)


# ---------------------------------------------------------------------------------- trainer
class VQTrainer:
    """Owns the optimiser, the EMA codebook statistics and the dead-code bookkeeping."""

    def __init__(self, tokenizer: VQTokenizer, config: VQTrainConfig | None = None):
        self.tok = tokenizer
        self.cfg = config if config is not None else VQTrainConfig()
        self.cfg.validate()
        codebook = self.tok.codebook  # (K, D) parameter
        k, d = codebook.shape
        self.ema = self.cfg.codebook_update == "ema"
        if self.ema:
            codebook.requires_grad_(False)
            self.ema_count = torch.ones(k)  # (K,) smoothed assignment counts
            self.ema_sum = codebook.detach().clone()  # (K, D) running sum of assigned latents
        params = [p for p in self.tok.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay,
                                     **adamw_kernel(params, "auto"))
        self.usage_since_check = torch.zeros(k, dtype=torch.long)
        self.step = 0
        self.restarted = 0
        self.in_warmup = False
        self.kmeans_latents = 0  # distinct latents the k-means init clustered (0: not run yet)
        self.frozen = False  # encoder and codebook frozen (freeze_encoder, once quantising)

    def _freeze_encoder(self) -> None:
        for module in (self.tok.model.encoder, self.tok.model.quant_conv):
            for p in module.parameters():
                p.requires_grad_(False)
                p.grad = None
        self.tok.codebook.requires_grad_(False)
        self.frozen = True

    def progress(self, step: int, elapsed_s: float = 0.0) -> float:
        """Fraction of the run done: by steps, or by wall clock when ``max_minutes`` is set."""
        frac = step / self.cfg.steps
        if self.cfg.max_minutes:
            frac = max(frac, elapsed_s / (60.0 * self.cfg.max_minutes))
        return min(1.0, frac)

    def lr_at(self, step: int, elapsed_s: float = 0.0) -> float:
        """Linear warmup, then cosine to ``min_lr_ratio * lr`` over the run (steps or time budget)."""
        c = self.cfg
        if step < c.warmup_steps:
            return c.lr * (step + 1) / c.warmup_steps
        if c.lr_schedule == "constant":
            return c.lr
        p = self.progress(step, elapsed_s)
        return c.lr * (c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))

    def loss(self, x: torch.Tensor, quantize: bool = True,
             tiles: bool = False) -> tuple[torch.Tensor, dict, torch.Tensor, torch.Tensor]:
        """x (B, 3, H, W) in [0, 1] -> (loss, parts, z (B, D, h, w) detached, codes (B, h, w)).

        quantize=False (the autoencoder warm-up): the decoder reads z itself and the codebook
        terms are left out (codes are still looked up, for the usage statistics).
        tiles=True: x is a batch of tiles (``VQTokenizer.image_tiles``), coded and decoded alone.
        """
        z = self.tok.encode_latents(x, tiles=tiles)  # (B, D, h, w)
        e, codes = self.tok.quantize(z)  # (B, D, h, w), (B, h, w)
        z_q = z + (e - z).detach() if quantize else z  # straight-through
        recon = self.tok.decode_latents(z_q, tiles=tiles)  # (B, 3, H, W) in [-1, 1]
        target = x * 2.0 - 1.0
        if self.cfg.recon_loss == "mse":
            rec = F.mse_loss(recon, target)
        else:
            rec = F.l1_loss(recon, target)
        commit = F.mse_loss(z, e.detach())
        loss = rec + self.cfg.beta * commit if quantize else rec
        parts = {"rec": rec.item(), "commit": commit.item()}
        if not self.ema and quantize:
            codebook_loss = F.mse_loss(e, z.detach())
            loss = loss + codebook_loss
            parts["codebook"] = codebook_loss.item()
        return loss, parts, z.detach(), codes

    @torch.no_grad()
    def _ema_update(self, z: torch.Tensor, codes: torch.Tensor) -> None:
        k, d = self.tok.codebook.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)  # (M, D)
        idx = codes.flatten()  # (M,)
        counts = torch.bincount(idx, minlength=k).float()  # (K,)
        sums = torch.zeros(k, d).index_add_(0, idx, flat)  # (K, D)
        g = self.cfg.ema_decay
        self.ema_count.mul_(g).add_(counts, alpha=1 - g)
        self.ema_sum.mul_(g).add_(sums, alpha=1 - g)
        n = self.ema_count.sum()
        smoothed = (self.ema_count + 1e-5) / (n + k * 1e-5) * n  # Laplace smoothing
        self.tok.codebook.data.copy_(self.ema_sum / smoothed[:, None])

    @torch.no_grad()
    def _restart_dead_codes(self, z: torch.Tensor, generator: torch.Generator) -> int:
        dead = (self.usage_since_check < self.cfg.dead_code_threshold).nonzero().flatten()
        self.usage_since_check.zero_()
        if dead.numel() == 0:
            return 0
        k, d = self.tok.codebook.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)  # (M, D)
        live = torch.ones(k, dtype=torch.bool)
        live[dead] = False
        if self.cfg.dead_code_sampling == "far":
            pick = _far_picks(flat, self.tok.normalized_codebook()[live], dead.numel(), generator)
        else:
            pick = torch.randint(0, flat.shape[0], (dead.numel(),), generator=generator)
        new = flat[pick] + 1e-3 * torch.randn(dead.numel(), d, generator=generator)
        self.tok.codebook.data[dead] = new
        if self.ema:
            self.ema_sum[dead] = new
            self.ema_count[dead] = 1.0
        else:  # stale Adam moments would drag the fresh code back
            state = self.opt.state.get(self.tok.codebook, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key][dead] = 0.0
        return int(dead.numel())

    @torch.no_grad()
    def _kmeans_init(self, images, generator: torch.Generator) -> int:
        """Set every code by k-means over the latents of (up to ``kmeans_images``) training images.

        Returns the number of distinct latents clustered.
        """
        c = self.cfg
        if not isinstance(images, torch.Tensor):
            raise ValueError("codebook_init='kmeans' needs the training images as one tensor (N, 3, H, W)")
        was_training = self.tok.training
        self.tok.eval()
        pick = torch.randperm(images.shape[0], generator=generator)[: c.kmeans_images]
        d = self.tok.codebook.shape[1]
        z = torch.cat([self.tok.encode_latents(_to_float(images[pick[i:i + 256]])).permute(0, 2, 3, 1).reshape(-1, d)
                       for i in range(0, pick.numel(), 256)])
        self.tok.train(was_training)
        z, counts = torch.unique(z, dim=0, return_counts=True)  # (M, D): identical patches collapse
        k = self.tok.codebook_size
        centres = z[_far_picks(z, z[:0], k, generator)]  # k-means++ seeding (duplicates once M < K)
        w = counts.float()
        for _ in range(c.kmeans_iters):
            assign = torch.cdist(z, centres, compute_mode="donot_use_mm_for_euclid_dist").argmin(dim=1)  # (M,) exact
            sums = torch.zeros(k, d).index_add_(0, assign, z * w[:, None])
            mass = torch.zeros(k).index_add_(0, assign, w)
            used = mass > 0
            centres[used] = sums[used] / mass[used, None]
            if self.tok.config.l2_normalize:
                centres = F.normalize(centres, dim=-1)
        self.tok.codebook.data.copy_(centres)
        if self.ema:
            self.ema_sum.copy_(centres)
            self.ema_count.fill_(1.0)
        return int(z.shape[0])

    def _crop(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Random (B, 3, c, c) crops, one offset per image, aligned to the downsample factor (the tile, if tiled)."""
        c, f = self.cfg.crop_size, self.tok.config.tile_size or self.tok.downsample_factor
        h, w = x.shape[-2:]
        if not c or c >= min(h, w):
            return x
        if c % f:
            raise ValueError(f"crop_size {c} is not a multiple of the downsample factor {f}")
        tops = torch.randint(0, (h - c) // f + 1, (x.shape[0],), generator=generator) * f
        lefts = torch.randint(0, (w - c) // f + 1, (x.shape[0],), generator=generator) * f
        return torch.stack([img[:, t : t + c, l : l + c] for img, t, l in zip(x, tops.tolist(), lefts.tolist())])

    def fit(
        self,
        images,
        eval_images: torch.Tensor | None = None,
        log: Callable[[dict], None] | None = None,
    ) -> dict:
        """Train for ``cfg.steps`` steps (or ``cfg.max_minutes``); return the final metrics."""
        c = self.cfg
        old_threads = torch.get_num_threads()
        if c.num_threads > 0:
            torch.set_num_threads(c.num_threads)
        gen = torch.Generator().manual_seed(c.seed)
        stream = _batches(images, c.batch_size, gen)
        history = []
        t0 = time.time()
        self.tok.train()
        try:
            while self.step < c.steps:
                elapsed = time.time() - t0
                if c.max_minutes and elapsed > 60.0 * c.max_minutes:
                    break
                x = self._crop(next(stream), gen)
                for group in self.opt.param_groups:
                    group["lr"] = self.lr_at(self.step, elapsed)
                warm = self.progress(self.step, elapsed) < c.ae_warmup
                if not warm and c.codebook_init == "kmeans" and not self.kmeans_latents:
                    self.kmeans_latents = self._kmeans_init(images, gen)
                    self.usage_since_check.zero_()
                    if c.freeze_encoder:
                        self._freeze_encoder()
                elif self.in_warmup and not warm:  # warm-up over: every code restarts at a latent
                    self.usage_since_check.zero_()
                    self.restarted += self._restart_dead_codes(self.tok.encode_latents(x).detach(), gen)
                self.in_warmup = warm
                if c.unique_tiles:
                    t = self.tok.config.tile_size
                    x = torch.unique(self.tok.image_tiles(x).flatten(1), dim=0).view(-1, x.shape[1], t, t)
                loss, parts, z, codes = self.loss(x, quantize=not warm, tiles=c.unique_tiles)
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                if c.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(
                        [p for g in self.opt.param_groups for p in g["params"]], c.grad_clip
                    )
                self.opt.step()
                if self.ema and not warm and not self.frozen:
                    self._ema_update(z, codes)
                self.usage_since_check += torch.bincount(codes.flatten(), minlength=self.tok.codebook_size)
                self.step += 1
                if (c.dead_code_every and self.step % c.dead_code_every == 0 and not self.frozen
                        and self.progress(self.step, time.time() - t0) <= c.dead_code_until):
                    self.restarted += self._restart_dead_codes(z, gen)
                row = {"step": self.step, "loss": loss.item(), **parts,
                       "batch_codes_used": int(codes.unique().numel()),
                       "time_s": round(time.time() - t0, 2)}
                history.append(row)
                if log is not None and (self.step % c.log_every == 0 or self.step == 1):
                    log(row)
                if eval_images is not None and c.eval_every and self.step % c.eval_every == 0:
                    m = evaluate_vq(self.tok, eval_images, c.eval_batch_size, c.palette)
                    if log is not None:
                        log({"step": self.step, "eval": m})
        finally:
            torch.set_num_threads(old_threads)
        result = {
            "steps": self.step,
            "train_time_s": round(time.time() - t0, 2),
            "codes_restarted": self.restarted,
            "kmeans_latents": self.kmeans_latents,
            "first_rec": history[0]["rec"] if history else float("nan"),
            "last_rec": sum(h["rec"] for h in history[-10:]) / max(1, len(history[-10:])),
            "history": history,
        }
        if eval_images is not None:
            result["eval"] = evaluate_vq(self.tok, eval_images, c.eval_batch_size, c.palette)
        return result


def train_vq(
    recipe: VQRecipe,
    images,
    eval_images: torch.Tensor | None = None,
    out_dir: str | Path | None = None,
    log: Callable[[dict], None] | None = None,
) -> tuple[VQTokenizer, dict]:
    """Build a tokenizer from ``recipe.model``, train it, save it to ``out_dir`` (if given).

    ``images``: tensor (N, 3, H, W) or iterable of images/batches.  When ``eval_images`` is None
    and ``images`` is a tensor, the last ``recipe.train.eval_images`` images are held out.
    """
    recipe.validate()
    torch.manual_seed(recipe.train.seed)
    if isinstance(images, torch.Tensor):
        if recipe.train.max_train_images:
            images = images[: recipe.train.max_train_images + (0 if eval_images is not None else recipe.train.eval_images)]
        if eval_images is None and recipe.train.eval_images > 0:
            if images.shape[0] <= recipe.train.eval_images:
                raise ValueError(f"{images.shape[0]} images cannot spare {recipe.train.eval_images} for eval")
            images, eval_images = images[: -recipe.train.eval_images], images[-recipe.train.eval_images :]
    tokenizer = VQTokenizer(recipe.model)
    result = VQTrainer(tokenizer, recipe.train).fit(images, eval_images, log=log)
    if out_dir is not None:
        from mmdiff.config import save_config

        out_dir = Path(out_dir)
        tokenizer.save_pretrained(out_dir)
        save_config(recipe, out_dir / "recipe.yaml")
    return tokenizer, result


def run_train_vq(
    config: str | Path | None,
    data: str | Path | list,
    out_dir: str | Path,
    overrides: list[str] | None = None,
    val_data: str | Path | list | None = None,
    log: Callable[[dict], None] | None = None,
) -> dict:
    """What ``tokenizers/train_vq.py`` does: YAML + overrides -> shards -> trained tokenizer in ``out_dir``.

    Returns the metrics (also written to ``out_dir/metrics.json``, without the per-step history).
    """
    import json

    from mmdiff.config import load_config

    recipe = load_config(VQRecipe, config, overrides or [])
    t = recipe.train
    limit = t.max_train_images + (t.eval_images if val_data is None else 0) if t.max_train_images else 0
    images = load_shard_images(data, recipe.model.image_size, limit=limit)
    eval_images = (load_shard_images(val_data, recipe.model.image_size, limit=t.eval_images)
                   if val_data is not None else None)
    tokenizer, result = train_vq(recipe, images, eval_images, out_dir=out_dir, log=log)
    metrics = {k: v for k, v in result.items() if k != "history"}
    metrics.update(num_train_images=int(images.shape[0]) - (0 if eval_images is not None else t.eval_images),
                   codebook_size=tokenizer.codebook_size, tokens_per_image=tokenizer.num_tokens(),
                   out_dir=str(out_dir))
    Path(out_dir, "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
