"""Pretraining the vision tower the way real towers are made: SigLIP on image-caption pairs.

A tiny transformers ``SiglipModel`` (vision + text tower) is trained from scratch with the
sigmoid pairwise loss on the world's image-caption pairs; only its vision tower is saved, as a
normal local ``SiglipVisionModel`` folder that ``mmdiff.models.vision.VisionConfig(backend="hf",
path=DIR)`` loads exactly like a downloaded SigLIP checkpoint.

The loss (SigLIP, Zhai et al. 2023), for a batch of B images x_i and texts y_j::

    logits_ij = exp(t') * <x_i, y_j> / (|x_i| |y_j|) + b       t' = log 10, b = -10 at init
    L         = -1/B * sum_i sum_j log sigmoid(z_ij * logits_ij)   z_ij = +1 if pair (i, j) matches, else -1

transformers' ``SiglipModel(return_loss=True)`` implements exactly this with ``z = 2 * eye - 1``;
``sigmoid_loss`` below is the same sum with an arbitrary label matrix, because in a small world
two images of one batch may show the same scene (same canonical caption): their cross pairs are
true positives, not negatives.  transformers initialises ``t' = b = 0``; the paper's
``log 10 / -10`` start (the bias makes the many negatives cheap from step one) is set here.

Design choices for the downstream unified model (which reads the patch features of layer -2
through a projector, not the pooled embedding):

* **Patch 8 on 32 px** (16 tokens) by default: every image costs the diffusion LM 16 tokens
  instead of 64, and a small object (5 px) still sits mostly inside one 8x8 patch.  Patch 4 is a
  config switch away (``model.patch_size=4``); see the exploration in ``vision-siglip-shapes.yaml``.
* **MAP pooling head** (SigLIP's ``vision_use_head``): the pooled embedding is an attention
  read-out of the patch tokens, so matching a caption that names every object's colour, shape,
  size and cell forces that information into the per-patch features the read-out attends to.
* **2-D sin-cos start for the position table** (``model.position_init``; the table stays a
  learned parameter, so the checkpoint is a plain SigLIP one).  With transformers' default
  N(0, 1/width) start the position signal is ~8x weaker than the patch content and 90 s of CPU
  learn colours and shapes but hardly cells (cell contrast 0.58, chance 0.5); with sin-cos it
  reaches ~0.9 (the exploration table in ``train/configs/vision-siglip-shapes.yaml``).
* **Hard negatives** (``train.hard_negatives``, NegCLIP-style, off by default): each image also
  brings a caption of itself with one object's colour, shape, size or cell changed (random
  template), appended as extra text columns of the logit matrix.  Within a 90 s budget they cost
  more steps than they gain; the option is there for longer runs.
* **No augmentation**: flips and crops would change "left" / "top" and the cell of an object.
* **Per-patch check** (``patch_probe``): a ridge-regression probe from the layer -2 feature of the
  patch under each cell's centre to that cell's colour / shape / size (or "empty"), fitted on
  training images and scored on held-out ones, for the trained tower and for its random
  initialisation.  It is what tells whether the features the projector sees are local and
  informative, which retrieval accuracy (a pooled metric) cannot.

Metrics: zero-shot retrieval (image -> caption top-1 among batches of 64 held-out pairs, and
text -> image), single-object zero-shot classification among all 9 x 6 x 3 x 2 canonical
one-object captions, and attribute contrast (the true canonical caption must outscore the same
caption with one object's colour / shape / size / cell changed).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "SiglipTowerConfig",
    "VisionPretrainConfig",
    "VisionPretrainRecipe",
    "PairData",
    "load_pairs",
    "build_siglip",
    "sigmoid_loss",
    "evaluate_siglip",
    "patch_probe",
    "save_vision_tower",
    "pretrain_vision",
    "run_pretrain_vision",
]

ATTRIBUTES = ("color", "shape", "size", "cell")
RETRIEVAL_BATCH = 64  # image -> caption top-1 among this many held-out pairs


# ---------------------------------------------------------------------------------- configs
@dataclass
class SiglipTowerConfig:
    """The two towers.  The vision tower is what is kept; the text tower is thrown away."""

    image_size: int = 32
    patch_size: int = 8  # 8 -> 4x4 = 16 patch tokens; 4 -> 8x8 = 64
    hidden_size: int = 64  # also the shared embedding width (the text head projects to it)
    intermediate_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    text_hidden_size: int = 64
    text_intermediate_size: int = 128
    text_num_hidden_layers: int = 2
    text_num_attention_heads: int = 4
    max_text_length: int = 40  # captions are right-padded / truncated to this many tokens
    # initial value of the (learned) patch position table: "sincos" = 2-D sin-cos (MAE), "normal" =
    # transformers' default N(0, 1/width), about 8x weaker than the patch content at width 64
    position_init: Literal["sincos", "normal"] = "sincos"

    def validate(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")
        for w, h in ((self.hidden_size, self.num_attention_heads),
                     (self.text_hidden_size, self.text_num_attention_heads)):
            if w % h:
                raise ValueError(f"hidden size {w} is not divisible by {h} heads")
        if self.position_init == "sincos" and self.hidden_size % 4:
            raise ValueError(f"position_init='sincos' needs hidden_size divisible by 4, got {self.hidden_size}")
        if self.num_hidden_layers < 2:
            raise ValueError("the vision tower needs >= 2 layers (the unified model reads layer -2)")
        if self.max_text_length < 2:
            raise ValueError("max_text_length must be >= 2")


@dataclass
class VisionPretrainConfig:
    """Optimisation, budget and evaluation."""

    steps: int = 3000  # upper bound; max_minutes usually ends the run first
    max_minutes: float = 1.5  # wall-clock budget for the optimisation steps; 0 = none
    batch_size: int = 64
    lr: float = 2.0e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 1.0e-4
    grad_clip: float = 1.0
    logit_scale_init: float = 2.302585  # log 10, the SigLIP paper's t'
    logit_bias_init: float = -10.0
    hard_negatives: float = 0.0  # per image, this many extra captions with one attribute changed (0: none)
    # grounded region-phrase loss (RegionCLIP / SigLIP 2's dense objectives): each object's box pools
    # the layer-``region_layer`` patch features (overlap-weighted), a linear head maps them into the
    # text space and a sigmoid loss pairs them with the object's phrase ("small red circle"; the
    # record's ``phrase`` when given) against every other phrase of the batch.  Needs per-object
    # ``bbox`` records (the world's ``objects``); 0 = off
    region_loss_weight: float = 0.0
    region_layer: int = -2
    # patch reconstruction (a dense objective in the spirit of MAE, without masking): a linear decoder
    # maps each layer-``region_layer`` patch token back to its own normalised pixels (MSE).  The
    # sigmoid loss alone keeps what tells captions apart and drops the rest -- a trained tower's
    # features read shape worse than a random tower's (BENCHMARKS.md, session 5) -- so this keeps each
    # patch's content, shape fragments included, linearly in the features the unified model reads; 0 = off
    patch_reconstruction_weight: float = 0.0
    num_threads: int = 1  # torch threads (0: leave torch's default)
    max_train_samples: int = 0  # 0: every sample of the shards
    eval_samples: int = 512  # held out from the training shards when no eval shards are given
    probe_samples: int = 2000  # training images the patch probe is fitted on (0: no probe)
    log_every: int = 50
    seed: int = 0

    def validate(self) -> None:
        if self.steps < 1 or self.batch_size < 2:
            raise ValueError("steps must be >= 1 and batch_size >= 2 (the loss needs negatives)")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("lr must be > 0 and min_lr_ratio in [0, 1]")
        if self.max_minutes < 0 or self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("max_minutes, warmup_steps, weight_decay and grad_clip must be >= 0")
        if self.hard_negatives < 0:
            raise ValueError("hard_negatives must be >= 0")
        if self.region_loss_weight < 0:
            raise ValueError(f"region_loss_weight must be >= 0, got {self.region_loss_weight}")
        if self.patch_reconstruction_weight < 0:
            raise ValueError(f"patch_reconstruction_weight must be >= 0, got {self.patch_reconstruction_weight}")
        if self.eval_samples < 0 or self.probe_samples < 0 or self.max_train_samples < 0:
            raise ValueError("sample counts must be >= 0")


@dataclass
class VisionPretrainRecipe:
    """The YAML file ``train/configs/vision-siglip-shapes.yaml``."""

    model: SiglipTowerConfig = field(default_factory=SiglipTowerConfig)
    train: VisionPretrainConfig = field(default_factory=VisionPretrainConfig)

    def validate(self) -> None:
        self.model.validate()
        self.train.validate()


# ---------------------------------------------------------------------------------- data
@dataclass
class PairData:
    """Image-caption pairs in memory, captions pre-tokenised.

    ``images`` (N, 3, S, S) uint8; ``caption_ids`` (C, L) token ids of every paraphrase of every
    image, image n owning rows ``cap_start[n] : cap_start[n] + cap_count[n]``; ``scene_ids`` (N,)
    equal for images whose canonical captions are equal (true positives of one another);
    ``captions`` the caption shown for retrieval (one paraphrase per image); ``objects`` the
    world's object records (empty for data without them).
    """

    images: torch.Tensor
    caption_ids: torch.Tensor
    cap_start: torch.Tensor
    cap_count: torch.Tensor
    scene_ids: torch.Tensor
    captions: list[str]
    objects: list[list[dict]]
    scene_index: dict[str, int] = field(default_factory=dict)  # canonical caption -> scene id

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, index: slice) -> "PairData":
        """Images ``index`` (a slice) with their caption rows."""
        n = torch.arange(len(self))[index]
        if len(n) == 0:
            raise ValueError("empty subset")
        lo, hi = int(self.cap_start[n[0]]), int(self.cap_start[n[-1]] + self.cap_count[n[-1]])
        return PairData(self.images[index], self.caption_ids[lo:hi], self.cap_start[index] - lo,
                        self.cap_count[index], self.scene_ids[index], self.captions[index],
                        self.objects[index], self.scene_index)


class CaptionEncoder:
    """text -> (L,) ids: the tokenizer's ids, right-padded with its pad id to a fixed length.

    SigLIP's text tower pools the *last* position and runs without an attention mask (as the
    original model was trained, ``padding="max_length"``), so the fixed length matters and the
    pad tokens act as read-out slots.
    """

    def __init__(self, tokenizer, max_length: int):
        if tokenizer.pad_token_id is None:
            raise ValueError("the text tokenizer has no pad token")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pad_id = int(tokenizer.pad_token_id)
        self.truncated = 0

    def __call__(self, texts: list[str]) -> torch.Tensor:
        rows = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        out = torch.full((len(rows), self.max_length), self.pad_id, dtype=torch.long)
        for i, ids in enumerate(rows):
            if len(ids) > self.max_length:
                self.truncated += 1
                ids = ids[: self.max_length]
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out  # (len(texts), L)


def load_pairs(shards, encode: CaptionEncoder, image_size: int, limit: int = 0) -> PairData:
    """Webdataset shards (a directory, a tar or a list) -> ``PairData``.

    Paraphrases: the JSON ``captions`` (every template for world samples), else the caption.
    Images are resized with nearest-neighbour only when they are not ``image_size`` already.
    """
    from PIL import Image

    from mmdiff.data.shards import read_samples

    images, texts, shown, objects, counts, keys = [], [], [], [], [], []
    for s in read_samples(shards):
        paraphrases = [c for c in (s.captions or [s.caption]) if c]
        if s.image is None or not paraphrases:
            continue
        img = s.image.convert("RGB")
        scale = (image_size / img.size[0], image_size / img.size[1])
        if img.size != (image_size, image_size):
            img = img.resize((image_size, image_size), Image.NEAREST)
        images.append(np.asarray(img, dtype=np.uint8))
        texts.extend(paraphrases)
        counts.append(len(paraphrases))
        shown.append(s.caption or paraphrases[0])
        objects.append([_scaled_box(o, scale) for o in (s.meta.get("objects") or [])])
        keys.append(paraphrases[0])  # canonical caption: the scene as text can tell it
        if limit and len(images) >= limit:
            break
    if not images:
        raise ValueError(f"no image-caption pairs in {shards}")
    ids = encode(texts)
    count = torch.tensor(counts, dtype=torch.long)
    start = torch.cumsum(count, 0) - count
    scene_of = {k: i for i, k in enumerate(dict.fromkeys(keys))}
    return PairData(
        images=torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(),  # (N, 3, S, S)
        caption_ids=ids, cap_start=start, cap_count=count,
        scene_ids=torch.tensor([scene_of[k] for k in keys], dtype=torch.long),
        captions=shown, objects=objects, scene_index=scene_of,
    )


def _scaled_box(obj, scale: tuple[float, float]):
    """An object record with its ``bbox`` (x0, y0, x1, y1 pixels) moved to the resized image."""
    if not isinstance(obj, dict) or scale == (1.0, 1.0) or not isinstance(obj.get("bbox"), (list, tuple)):
        return obj
    x0, y0, x1, y1 = obj["bbox"]
    return {**obj, "bbox": [x0 * scale[0], y0 * scale[1], x1 * scale[0], y1 * scale[1]]}


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, S, S) -> float (N, 3, S, S) in [-1, 1]: SigLIP's mean = std = 0.5."""
    return images.float().div(255.0).sub(0.5).div(0.5)


# ---------------------------------------------------------------------------------- model
def build_siglip(cfg: SiglipTowerConfig, vocab_size: int, pad_id: int, eos_id: int | None = None,
                 bos_id: int | None = None, logit_scale_init: float = math.log(10.0),
                 logit_bias_init: float = -10.0):
    """A from-scratch transformers ``SiglipModel`` with SigLIP's t' / b initialisation."""
    from transformers import SiglipConfig, SiglipModel

    cfg.validate()
    vision = dict(image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_size=cfg.hidden_size,
                  intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
                  num_attention_heads=cfg.num_attention_heads, vision_use_head=True)
    text = dict(vocab_size=vocab_size, hidden_size=cfg.text_hidden_size,
                intermediate_size=cfg.text_intermediate_size, num_hidden_layers=cfg.text_num_hidden_layers,
                num_attention_heads=cfg.text_num_attention_heads, max_position_embeddings=cfg.max_text_length,
                projection_size=cfg.hidden_size, pad_token_id=pad_id, eos_token_id=eos_id, bos_token_id=bos_id)
    model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
    with torch.no_grad():
        if cfg.position_init == "sincos":
            table = model.vision_model.embeddings.position_embedding.weight  # (P, D)
            table.copy_(sincos_2d(cfg.image_size // cfg.patch_size, cfg.hidden_size))
        model.logit_scale.fill_(logit_scale_init)
        model.logit_bias.fill_(logit_bias_init)
    return model


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """(grid * grid, dim) 2-D sin-cos position code (MAE): half the channels code the row, half the column."""
    if dim % 4:
        raise ValueError(f"sin-cos position code needs a width divisible by 4, got {dim}")
    freqs = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # (dim/4,)
    pos = torch.arange(grid, dtype=torch.float64)[:, None] * freqs[None]  # (grid, dim/4)
    code = torch.cat([pos.sin(), pos.cos()], dim=1)  # (grid, dim/2)
    rows = code[:, None, :].expand(grid, grid, -1)
    cols = code[None, :, :].expand(grid, grid, -1)
    return torch.cat([rows, cols], dim=-1).reshape(grid * grid, dim).float()  # row-major patches


def sigmoid_loss(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """SigLIP loss: -1/B sum_ij log sigmoid(z_ij * logits_ij), z = +1 on positives, -1 elsewhere.

    ``logits`` (B, T) image x text (T >= B when extra negative texts are appended); ``positives``
    (B, T) bool.  With ``positives = eye`` this is
    exactly ``SiglipModel(return_loss=True).loss``.
    """
    z = positives.to(logits.dtype) * 2.0 - 1.0  # (B, T)
    return -F.logsigmoid(z * logits).sum(dim=-1).mean()


@torch.no_grad()
def _embed_images(model, pixels: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    out = [model.get_image_features(pixel_values=normalise(pixels[i:i + chunk])).pooler_output
           for i in range(0, pixels.shape[0], chunk)]
    return F.normalize(torch.cat(out), dim=-1)  # (N, D)


@torch.no_grad()
def _embed_texts(model, ids: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    out = [model.get_text_features(input_ids=ids[i:i + chunk]).pooler_output for i in range(0, ids.shape[0], chunk)]
    return F.normalize(torch.cat(out), dim=-1)  # (N, D)


# ---------------------------------------------------------------------------------- evaluation
def _canonical(objects: list[dict], template: int = 0) -> str:
    """The caption of ``objects`` (row-major, as the world writes it) with template ``template``."""
    from mmdiff.world import CAPTION_TEMPLATES, CELLS, SceneObject

    objs = sorted(objects, key=lambda o: CELLS.index(o["cell"]))
    return CAPTION_TEMPLATES[template].render([SceneObject(o["shape"], o["color"], o["size"], o["cell"], (0, 0, 0, 0))
                                        for o in objs])


def _perturb(objects: list[dict], attr: str, rng: np.random.Generator) -> list[dict] | None:
    """The same objects with one object's ``attr`` changed (cells stay distinct)."""
    from mmdiff.world import CELLS, COLORS, SHAPES, SIZES

    values = {"color": COLORS, "shape": SHAPES, "size": SIZES, "cell": CELLS}[attr]
    k = int(rng.integers(len(objects)))
    taken = {o["cell"] for o in objects} if attr == "cell" else {objects[k][attr]}
    options = [v for v in values if v not in taken]
    if not options:
        return None
    out = [dict(o) for o in objects]
    out[k][attr] = options[int(rng.integers(len(options)))]
    return out


@torch.no_grad()
def evaluate_siglip(model, data: PairData, encode: CaptionEncoder, seed: int = 0) -> dict:
    """Retrieval, single-object zero-shot classification and attribute contrast on ``data``."""
    from mmdiff.world import CELLS, COLORS, SHAPES, SIZES

    model.eval()
    img = _embed_images(model, data.images)  # (N, D)
    txt = _embed_texts(model, encode(data.captions))  # (N, D)
    out: dict = {}
    # image -> caption and caption -> image top-1 among blocks of RETRIEVAL_BATCH pairs
    n_blocks = max(1, len(data) // RETRIEVAL_BATCH)
    i2t = t2i = total = 0
    for b in range(n_blocks):
        sl = slice(b * RETRIEVAL_BATCH, min(len(data), (b + 1) * RETRIEVAL_BATCH))
        sim = img[sl] @ txt[sl].T  # (b, b)
        same = data.scene_ids[sl][:, None] == data.scene_ids[sl][None, :]  # (b, b)
        rows = torch.arange(sim.shape[0])
        i2t += int(same[rows, sim.argmax(1)].sum())
        t2i += int(same[sim.argmax(0), rows].sum())
        total += sim.shape[0]
    out.update(retrieval_i2t=i2t / total, retrieval_t2i=t2i / total, retrieval_batch=min(RETRIEVAL_BATCH, len(data)))

    with_objects = [i for i, o in enumerate(data.objects) if o]
    if not with_objects:
        return out
    # single-object zero-shot: the nearest of all 9 x 6 x 3 x 2 one-object canonical captions
    single = [i for i in with_objects if len(data.objects[i]) == 1]
    if single:
        cands = [dict(shape=s, color=c, size=z, cell=l) for l in CELLS for c in COLORS for s in SHAPES for z in SIZES]
        cand_txt = _embed_texts(model, encode([_canonical([c]) for c in cands]))  # (324, D)
        best = (img[single] @ cand_txt.T).argmax(1)  # (n_single,)
        hits = {a: 0 for a in ATTRIBUTES}
        exact = 0
        for i, j in zip(single, best.tolist()):
            truth, guess = data.objects[i][0], cands[j]
            ok = [truth[a] == guess[a] for a in ATTRIBUTES]
            exact += all(ok)
            for a, o in zip(ATTRIBUTES, ok):
                hits[a] += o
        out["single_object_top1"] = exact / len(single)
        out["single_object_attr"] = {a: hits[a] / len(single) for a in ATTRIBUTES}
        out["single_object_n"] = len(single)
        out["single_object_candidates"] = len(cands)
    # attribute contrast: true canonical caption vs. one attribute of one object changed
    rng = np.random.default_rng(seed)
    contrast = {}
    for attr in ATTRIBUTES:
        pairs = [(i, _perturb(data.objects[i], attr, rng)) for i in with_objects]
        pairs = [(i, p) for i, p in pairs if p is not None]
        if not pairs:
            continue
        idx = [i for i, _ in pairs]
        true_txt = _embed_texts(model, encode([_canonical(data.objects[i]) for i in idx]))
        false_txt = _embed_texts(model, encode([_canonical(p) for _, p in pairs]))
        margin = (img[idx] * true_txt).sum(-1) - (img[idx] * false_txt).sum(-1)  # (n,)
        contrast[attr] = float((margin > 0).float().mean())
    out["contrast"] = contrast
    return out


def _cell_patches(image_size: int, patch: int) -> list[list[int]]:
    """Row-major indices of the patches that overlap each cell, cells in ``CELLS`` order.

    At 32 px the cells are pixel columns [0, 11), [11, 21), [21, 32) (``mmdiff.world.geometry``);
    with patch 8 every cell overlaps a 2 x 2 block of patches, with patch 4 a 3-4 x 3-4 block.
    """
    from mmdiff.world import geometry

    grid = image_size // patch
    bounds = geometry(image_size).bounds  # 4 pixel boundaries per axis
    spans = [range(bounds[i] // patch, (bounds[i + 1] - 1) // patch + 1) for i in range(3)]
    return [[r * grid + c for r in spans[row] for c in spans[col]] for row in range(3) for col in range(3)]


@torch.no_grad()
def _layer_features(vision, images: torch.Tensor, layer: int, chunk: int = 256) -> torch.Tensor:
    """(N, 3, S, S) uint8 -> (N, P, D): hidden state ``layer`` (as ``VisionEncoder`` reads it)."""
    out = [vision(pixel_values=normalise(images[i:i + chunk]), output_hidden_states=True).hidden_states[layer]
           for i in range(0, images.shape[0], chunk)]
    return torch.cat(out)


def _cell_labels(objects: list[list[dict]]) -> dict[str, torch.Tensor]:
    """Per image and cell: colour (0 = empty, 1..6), shape (0 = empty, 1..3), size (0 = empty, 1..2)."""
    from mmdiff.world import CELLS, COLORS, SHAPES, SIZES

    vocab = {"color": COLORS, "shape": SHAPES, "size": SIZES}
    labels = {a: torch.zeros(len(objects), len(CELLS), dtype=torch.long) for a in vocab}
    for n, objs in enumerate(objects):
        for o in objs:
            c = CELLS.index(o["cell"])
            for a, values in vocab.items():
                labels[a][n, c] = values.index(o[a]) + 1
    return labels


def _ridge_classifier(x: torch.Tensor, y: torch.Tensor, k: int, ridge: float) -> torch.Tensor:
    """Least squares onto one-hot targets: x (n, F) float64 with a bias column, y (n,) -> W (F, k)."""
    gram = x.T @ x + ridge * x.shape[0] * torch.eye(x.shape[1], dtype=x.dtype)
    return torch.linalg.solve(gram, x.T @ F.one_hot(y, k).to(x.dtype))


def patch_probe(vision, train: PairData, test: PairData, layer: int = -2, ridge: float = 1e-3) -> dict:
    """Linear probe: the layer-``layer`` features of a cell's patches -> that cell's colour / shape / size.

    For each of the 9 cells, the features of the patches overlapping it are concatenated and a
    ridge-regression classifier (one per cell and attribute; classes include "empty") is fitted
    on ``train`` and scored on ``test``.  Reported: accuracy over occupied test cells
    (``color``, ``shape``, ``size``), and ``object`` = all three right.  Local features that
    carry each object's look give high numbers; features that only make sense pooled do not.
    """
    vision.eval()
    cfg = vision.config
    cells = _cell_patches(cfg.image_size, cfg.patch_size)
    feats = [_layer_features(vision, d.images, layer) for d in (train, test)]  # (N, P, D)
    mu, sd = feats[0].mean((0, 1)), feats[0].std((0, 1)) + 1e-6
    feats = [((f - mu) / sd).double() for f in feats]
    labels = [_cell_labels(d.objects) for d in (train, test)]
    right = {a: [] for a in ("color", "shape", "size")}
    occupied = []
    for c, patches in enumerate(cells):
        xtr, xte = [torch.cat([f[:, patches].flatten(1), torch.ones(f.shape[0], 1, dtype=f.dtype)], 1) for f in feats]
        occ = labels[1]["color"][:, c] > 0
        occupied.append(occ)
        for a in right:
            ytr, yte = labels[0][a][:, c], labels[1][a][:, c]
            w = _ridge_classifier(xtr, ytr, int(max(ytr.max(), yte.max())) + 1, ridge)
            right[a].append((xte @ w).argmax(-1) == yte)
    occ = torch.stack(occupied)  # (9, N_test)
    hits = {a: torch.stack(v) for a, v in right.items()}  # (9, N_test) bool
    out = {a: float(h[occ].double().mean()) for a, h in hits.items()}
    out["object"] = float((hits["color"] & hits["shape"] & hits["size"])[occ].double().mean())
    out["empty"] = float(hits["color"][~occ].double().mean())
    return out


# ---------------------------------------------------------------------------------- saving
def save_vision_tower(model, out_dir: str | Path) -> Path:
    """Write the vision tower alone: ``SiglipVisionModel`` safetensors + config + preprocessor.

    The preprocessor keeps 32 px images as they are (size = image_size, nearest resampling, no
    crop), then rescales to [0, 1] and normalises with mean = std = 0.5: flat-colour pixels stay
    exact instead of being blurred by a bilinear/bicubic resize.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vision = model.vision_model
    vision.save_pretrained(out, safe_serialization=True)
    size = vision.config.image_size
    proc = {
        "image_processor_type": "SiglipImageProcessor",
        "do_resize": True, "size": {"height": size, "width": size}, "resample": 0,  # PIL NEAREST
        "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "do_convert_rgb": True,
    }
    (out / "preprocessor_config.json").write_text(json.dumps(proc, indent=2) + "\n")
    return out


# ---------------------------------------------------------------------------------- training
def _lr_at(cfg: VisionPretrainConfig, step: int, elapsed_s: float) -> float:
    """Linear warmup, then cosine to ``min_lr_ratio * lr`` over steps or the time budget."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    p = step / cfg.steps
    if cfg.max_minutes:
        p = max(p, elapsed_s / (60.0 * cfg.max_minutes))
    p = min(1.0, p)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def _optimizer(model, cfg: VisionPretrainConfig) -> torch.optim.Optimizer:
    from mmdiff.training.optim import adamw_kernel, no_decay_param_ids

    skip = no_decay_param_ids(model)
    decay = [p for p in model.parameters() if p.requires_grad and id(p) not in skip]
    rest = [p for p in model.parameters() if p.requires_grad and id(p) in skip]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95),
                             **adamw_kernel(decay + rest, "auto"))


def _hard_negatives(data: PairData, idx: torch.Tensor, encode: CaptionEncoder, rate: float,
                    rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions of batch images with one object's colour / shape / size / cell changed.

    Returns ids (H, L) and their scene ids (H,) (-1 when no training scene has that caption), so
    a negative that happens to describe another image of the batch is labelled a positive there.
    Each uses a random template: the negatives must not be told apart by their wording.
    """
    from mmdiff.world import CAPTION_TEMPLATES

    texts, scenes = [], []
    for i in idx.tolist():
        for _ in range(int(rate) + (rng.random() < rate - int(rate))):
            if not data.objects[i]:
                continue
            objs = _perturb(data.objects[i], ATTRIBUTES[int(rng.integers(len(ATTRIBUTES)))], rng)
            if objs is None:
                continue
            texts.append(_canonical(objs, int(rng.integers(len(CAPTION_TEMPLATES)))))
            scenes.append(data.scene_index.get(_canonical(objs), -1))
    if not texts:
        return data.caption_ids[:0], data.scene_ids[:0]
    return encode(texts), torch.tensor(scenes, dtype=torch.long)


def region_phrase(obj) -> str | None:
    """An object's phrase: its ``phrase`` field, else "{size} {color} {shape}" (world records)."""
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("phrase"), str) and obj["phrase"].strip():
        return obj["phrase"].strip()
    parts = [obj.get(k) for k in ("size", "color", "shape")]
    return " ".join(parts) if all(isinstance(p, str) and p for p in parts) else None


def region_weights(bbox, image_size: int, patch: int) -> torch.Tensor | None:
    """(P,) share of the box ``bbox`` = (x0, y0, x1, y1) pixels (x1, y1 exclusive) that falls in each
    patch (row-major), summing to 1; None for a box outside the image or empty."""
    grid = image_size // patch
    x0, y0, x1, y1 = (float(v) for v in bbox)
    edges = torch.arange(grid + 1, dtype=torch.float64) * patch
    ox = (torch.minimum(edges[1:], torch.tensor(x1)) - torch.maximum(edges[:-1], torch.tensor(x0))).clamp(min=0)
    oy = (torch.minimum(edges[1:], torch.tensor(y1)) - torch.maximum(edges[:-1], torch.tensor(y0))).clamp(min=0)
    w = (oy[:, None] * ox[None, :]).flatten()  # (P,) overlap areas
    total = w.sum()
    return None if total <= 0 else (w / total).float()


class RegionHead(torch.nn.Module):
    """Pooled box features -> the text embedding space, with the loss's own t' and b (SigLIP init)."""

    def __init__(self, vision_dim: int, text_dim: int, logit_scale_init: float, logit_bias_init: float):
        super().__init__()
        self.proj = torch.nn.Linear(vision_dim, text_dim)
        self.logit_scale = torch.nn.Parameter(torch.tensor(float(logit_scale_init)))
        self.logit_bias = torch.nn.Parameter(torch.tensor(float(logit_bias_init)))


def _all_regions(data: PairData, image_size: int, patch: int, encode: CaptionEncoder):
    """Every usable boxed object of ``data``, computed once: (weights (R, P), image index (R,),
    phrase index (R,), phrase token ids (U, L)), or None when there is none."""
    rows, owner, which, table = [], [], [], {}
    for n, objs in enumerate(data.objects):
        for o in objs:
            phrase = region_phrase(o)
            box = o.get("bbox") if isinstance(o, dict) else None
            if not phrase or not isinstance(box, (list, tuple)) or len(box) != 4:
                continue
            w = region_weights(box, image_size, patch)
            if w is not None:
                rows.append(w), owner.append(n), which.append(table.setdefault(phrase, len(table)))
    if not rows:
        return None
    return (torch.stack(rows), torch.tensor(owner, dtype=torch.long), torch.tensor(which, dtype=torch.long),
            encode(list(table)))


def _batch_regions(regions, idx: torch.Tensor):
    """The regions of the batch images ``idx``: (weights (R, P), batch row (R,), phrase index (R,),
    phrase ids (U, L)) or None."""
    if regions is None:
        return None
    weights, owner, which, phrase_ids = regions
    sel, rows = (owner[:, None] == idx[None, :]).nonzero(as_tuple=True)  # region, its row in the batch
    if len(sel) == 0:
        return None
    return weights[sel], rows, which[sel], phrase_ids


def region_loss(head: RegionHead, model, features: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor,
                which: torch.Tensor, phrase_ids: torch.Tensor) -> torch.Tensor:
    """Sigmoid loss between each box's pooled features and every distinct phrase of the batch.

    ``features`` (B, P, D) patch features; region r pools row ``rows[r]`` with ``weights[r]`` (P,)
    and its phrase is row ``which[r]`` of ``phrase_ids`` (U, L).
    """
    pooled = torch.einsum("rp,rpd->rd", weights, features[rows])  # (R, D)
    regions = F.normalize(head.proj(pooled), dim=-1)
    present, slot = torch.unique(which, return_inverse=True)  # the batch's phrases, each region's column
    texts = F.normalize(model.get_text_features(input_ids=phrase_ids[present]).pooler_output, dim=-1)  # (U', D)
    logits = regions @ texts.T * head.logit_scale.exp() + head.logit_bias  # (R, U')
    positives = slot[:, None] == torch.arange(len(present))[None, :]
    return sigmoid_loss(logits, positives)


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, P, C * patch * patch), patches in row-major order (the tower's token order)."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // patch) * (w // patch), c * patch * patch)


def reconstruction_loss(decoder: torch.nn.Module, features: torch.Tensor, pixels: torch.Tensor,
                        patch: int) -> torch.Tensor:
    """MSE between ``decoder(features)`` (B, P, D) -> (B, P, C*patch*patch) and the patches of ``pixels``."""
    target = patchify(pixels, patch)
    if features.shape[1] != target.shape[1]:  # a prefix (CLS) token is not a patch
        features = features[:, features.shape[1] - target.shape[1]:]
    return F.mse_loss(decoder(features), target)


def _fit(model, data: PairData, cfg: VisionPretrainConfig, encode: CaptionEncoder,
         log: Callable[[dict], None] | None) -> dict:
    gen = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    vc = model.vision_model.config
    head = None
    if cfg.region_loss_weight > 0:
        head = RegionHead(vc.hidden_size, model.config.text_config.projection_size,
                          cfg.logit_scale_init, cfg.logit_bias_init)
    decoder = None
    if cfg.patch_reconstruction_weight > 0:
        decoder = torch.nn.Linear(vc.hidden_size, vc.num_channels * vc.patch_size ** 2)
    extra = [m for m in (head, decoder) if m is not None]
    trained = torch.nn.ModuleList([model, *extra]) if extra else model  # heads and decoder are not saved
    all_regions = _all_regions(data, vc.image_size, vc.patch_size, encode) if head is not None else None
    dense = head is not None or decoder is not None
    opt = _optimizer(trained, cfg)
    model.train()
    region_history: list[float] = []
    recon_history: list[float] = []
    history: list[tuple[int, float]] = []
    n = len(data)
    batch = min(cfg.batch_size, n)
    perm, pos = torch.randperm(n, generator=gen), 0
    t0 = time.perf_counter()
    step = 0
    while step < cfg.steps:
        elapsed = time.perf_counter() - t0
        if cfg.max_minutes and elapsed > 60.0 * cfg.max_minutes:
            break
        if pos + batch > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos:pos + batch]
        pos += batch
        pick = data.cap_start[idx] + (torch.rand(batch, generator=gen) * data.cap_count[idx]).long()  # one paraphrase each
        lr = _lr_at(cfg, step, elapsed)
        for g in opt.param_groups:
            g["lr"] = lr
        neg_ids, neg_scenes = _hard_negatives(data, idx, encode, cfg.hard_negatives, rng)
        ids = torch.cat([data.caption_ids[pick], neg_ids])  # (B + H, L)
        regions = _batch_regions(all_regions, idx)
        pixels = normalise(data.images[idx])
        out = model(input_ids=ids, pixel_values=pixels, output_hidden_states=dense)  # logits (B, B + H)
        text_scenes = torch.cat([data.scene_ids[idx], neg_scenes])  # (B + H,)
        positives = data.scene_ids[idx][:, None] == text_scenes[None, :]  # (B, B + H)
        loss = sigmoid_loss(out.logits_per_image, positives)
        if regions is not None:
            feats = out.vision_model_output.hidden_states[cfg.region_layer]  # (B, P, D)
            r_loss = region_loss(head, model, feats, *regions)
            loss = loss + cfg.region_loss_weight * r_loss
            region_history.append(r_loss.item())
        if decoder is not None:
            feats = out.vision_model_output.hidden_states[cfg.region_layer]  # (B, P, D)
            p_loss = reconstruction_loss(decoder, feats, pixels, vc.patch_size)
            loss = loss + cfg.patch_reconstruction_weight * p_loss
            recon_history.append(p_loss.item())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(trained.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        history.append((step, loss.item()))
        if log is not None and (step % cfg.log_every == 0 or step == 1):
            log({"step": step, "loss": round(loss.item(), 4), "lr": lr,
                 **({"region_loss": round(region_history[-1], 4)} if region_history else {}),
                 **({"reconstruction_loss": round(recon_history[-1], 4)} if recon_history else {}),
                 "t": round(model.logit_scale.exp().item(), 2), "b": round(model.logit_bias.item(), 2),
                 "elapsed_s": round(time.perf_counter() - t0, 1)})
    return {"steps": step, "train_time_s": time.perf_counter() - t0, "history": history,
            "final_loss": float(np.mean([l for _, l in history[-20:]])) if history else float("nan"),
            "final_region_loss": float(np.mean(region_history[-20:])) if region_history else None,
            "final_reconstruction_loss": float(np.mean(recon_history[-20:])) if recon_history else None,
            "logit_scale": model.logit_scale.exp().item(), "logit_bias": model.logit_bias.item()}


def pretrain_vision(
    cfg: VisionPretrainRecipe,
    shards,
    out_dir: str | Path | None,
    tokenizer_dir: str | Path,
    eval_shards=None,
    log: Callable[[dict], None] | None = None,
) -> dict:
    """Train a SigLIP pair on ``shards``' image-caption pairs; save its vision tower to ``out_dir``.

    ``eval_shards``: held-out pairs for the metrics; when None the last ``train.eval_samples``
    pairs of ``shards`` are held out.  Returns the metrics (``history`` = [(step, loss)]); the
    saved folder loads with ``VisionEncoder(VisionConfig(backend="hf", path=out_dir))``.
    """
    from mmdiff.text_tokenizer import load_text_tokenizer

    cfg.validate()
    t = cfg.train
    threads = torch.get_num_threads()
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    try:
        torch.manual_seed(t.seed)
        t_load = time.perf_counter()
        tokenizer = load_text_tokenizer(tokenizer_dir)
        encode = CaptionEncoder(tokenizer, cfg.model.max_text_length)
        limit = t.max_train_samples + (t.eval_samples if eval_shards is None else 0) if t.max_train_samples else 0
        data = load_pairs(shards, encode, cfg.model.image_size, limit=limit)
        if eval_shards is not None:
            test = load_pairs(eval_shards, encode, cfg.model.image_size, limit=t.eval_samples)
        else:
            if len(data) <= t.eval_samples:
                raise ValueError(f"{len(data)} pairs cannot spare eval_samples={t.eval_samples} for evaluation")
            data, test = data.subset(slice(0, len(data) - t.eval_samples)), data.subset(slice(len(data) - t.eval_samples, None))
        load_s = time.perf_counter() - t_load

        model = build_siglip(cfg.model, len(tokenizer), encode.pad_id, tokenizer.eos_token_id,
                             tokenizer.bos_token_id, t.logit_scale_init, t.logit_bias_init)
        t_eval = time.perf_counter()
        probe_train = data.subset(slice(0, min(len(data), t.probe_samples))) if t.probe_samples else None
        has_objects = probe_train is not None and all(test.objects) and all(probe_train.objects)  # world data only
        probe_init = patch_probe(model.vision_model, probe_train, test) if has_objects else None
        eval_s = time.perf_counter() - t_eval

        result = _fit(model, data, t, encode, log)

        t_eval = time.perf_counter()
        metrics = evaluate_siglip(model, test, encode, seed=t.seed)
        if probe_init is not None:
            metrics["patch_probe"] = patch_probe(model.vision_model, probe_train, test)
            metrics["patch_probe_init"] = probe_init
        eval_s += time.perf_counter() - t_eval
        if out_dir is not None:
            from mmdiff.config import save_config

            save_vision_tower(model, out_dir)
            save_config(cfg, Path(out_dir) / "recipe.yaml")
    finally:
        torch.set_num_threads(threads)
    n_params = sum(p.numel() for p in model.vision_model.parameters())
    result.update(
        eval=metrics, num_train_pairs=len(data), num_eval_pairs=len(test), load_time_s=load_s,
        eval_time_s=eval_s, vision_params=n_params, patch_tokens=(cfg.model.image_size // cfg.model.patch_size) ** 2,
        captions_truncated=encode.truncated, out_dir=None if out_dir is None else str(out_dir),
    )
    return result


def run_pretrain_vision(
    config: str | Path | None,
    data,
    out_dir: str | Path,
    tokenizer_dir: str | Path,
    overrides: list[str] | None = None,
    eval_data=None,
    log: Callable[[dict], None] | None = None,
) -> dict:
    """What ``train/pretrain_vision.py`` does: YAML + overrides -> trained tower in ``out_dir``.

    Returns the metrics without the per-step history (also written to ``out_dir/metrics.json``;
    the loss curve goes to ``out_dir/loss_history.json``).
    """
    from mmdiff.config import load_config

    recipe = load_config(VisionPretrainRecipe, config, overrides or [])
    result = pretrain_vision(recipe, data, out_dir, tokenizer_dir, eval_shards=eval_data, log=log)
    metrics = {k: v for k, v in result.items() if k != "history"}
    Path(out_dir, "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    Path(out_dir, "loss_history.json").write_text(json.dumps(result["history"]) + "\n")
    return metrics
