"""Vision encoders for understanding: one adapter over transformers, open_clip and timm towers.

``VisionEncoder.encode_images(pixel_values) -> (N, P, D)`` patch features from an intermediate
layer, the LLaVA recipe (LLaDA-V, LaViDa): the projector (``mmdiff.models.projector``) maps
them into the language model's embedding space.

Backends (``VisionConfig.backend`` / ``arch``)
-----------------------------------------------
* ``hf``: transformers ``SiglipVisionModel`` (``arch="siglip"``), ``CLIPVisionModel``
  (``"clip"``) and ``Siglip2VisionModel`` (``"siglip2"``, NaFlex).  SigLIP2-NaFlex takes
  *patchified* pixels ``(N, max_patches, 3*p*p)`` plus ``pixel_attention_mask`` and
  ``spatial_shapes``; this adapter resizes every image to one fixed square (``image_size``,
  the size its processor picks for a square image with ``max_num_patches = (image_size/p)^2``),
  patchifies it exactly like ``Siglip2ImageProcessor`` (row-major patches, each flattened as
  (p, p, C)), and passes an all-ones mask - so there is no padding and no variable aspect
  ratio (native-aspect inputs are not supported).  The fixed-resolution SigLIP2 checkpoints
  (e.g. ``siglip2-so400m-patch14-384`` used by LLaDA-V) are ``model_type: siglip`` and load with
  ``arch="siglip"``.
* ``open_clip``: the visual tower of ``open_clip.create_model(arch)``; a custom architecture is
  registered from ``arch_kwargs`` (the open_clip model-config JSON), weights from a local CLIP
  checkpoint file (``pretrained=path``) or a ``local-dir:`` folder.  Intermediate features via
  ``visual.forward_intermediates``.
* ``timm``: ``timm.create_model(arch, **arch_kwargs)``; weights from a local safetensors file
  (``pretrained_cfg_overlay=dict(file=path)``) or a folder written by ``save_pretrained``
  (timm's own ``config.json`` + ``model.safetensors``, ``local-dir:``).  Features via
  ``forward_intermediates``.

``feature_layer`` indexes the hidden-state tuple the way transformers' ``output_hidden_states``
does: 0 = embeddings, i = output of block i, negative counts from the end (-1 = last block,
before any final norm; -2 = the LLaVA default).  open_clip/timm expose only block outputs, so 0
is refused there.  ``select="patch"`` drops the prefix tokens (CLS, registers); ``"cls_patch"``
keeps them in front.  SigLIP has no CLS, so both are the same there.

``image_transform()`` returns the torchvision transform (resize, centre crop, to tensor,
normalise) that matches the encoder's own preprocessing: ``preprocessor_config.json`` for HF
folders, open_clip's ``preprocess_cfg``, timm's ``resolve_model_data_config``.  Nothing is ever
downloaded: without ``path`` the tower is built with random weights (tests, debug runs).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn

__all__ = ["VisionConfig", "VisionEncoder", "build_vision_encoder", "tiny_vision_config"]

HF_ARCHS = ("siglip", "siglip2", "clip")
_INTERPOLATIONS = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


@dataclass
class VisionConfig:
    """Which vision tower, which layer, and how to preprocess."""

    backend: Literal["hf", "open_clip", "timm"] = "hf"
    # hf: "siglip" | "siglip2" | "clip" (read from config.json when ``path`` is set);
    # open_clip: a model-config name ("ViT-B-16", or a custom name defined by arch_kwargs);
    # timm: a model name ("vit_base_patch16_224").
    arch: str = "siglip"
    path: str | None = None  # local dir (hf, timm, open_clip) or checkpoint file (open_clip, timm)
    arch_kwargs: dict[str, Any] = field(default_factory=dict)  # config overrides for building from scratch
    feature_layer: int = -2
    select: Literal["patch", "cls_patch"] = "patch"
    freeze: bool = True
    image_size: int | None = None  # None: the encoder's own size
    mean: list[float] | None = None  # None: from the encoder's processor config
    std: list[float] | None = None

    def validate(self) -> None:
        if self.backend == "hf" and self.path is None and self.arch not in HF_ARCHS:
            raise ValueError(f"hf arch must be one of {HF_ARCHS}, got {self.arch!r}")
        if self.backend in ("open_clip", "timm") and self.feature_layer == 0:
            raise ValueError(f"feature_layer=0 (embeddings) is not available for {self.backend}")
        for name in ("mean", "std"):
            v = getattr(self, name)
            if v is not None and len(v) != 3:
                raise ValueError(f"{name} must have 3 values, got {v}")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")
        if self.image_size is not None and self.image_size <= 0:
            raise ValueError(f"image_size must be positive, got {self.image_size}")


@dataclass
class _Preprocess:
    """What the encoder's own processor does to an image."""

    image_size: int
    resize: int | tuple[int, int]  # int: shortest edge; tuple: (h, w)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"


def _layer_to_block(feature_layer: int, num_layers: int) -> int:
    """hidden_states index (0 = embeddings) -> block index for forward_intermediates."""
    idx = feature_layer % (num_layers + 1) if -(num_layers + 1) <= feature_layer <= num_layers else None
    if idx is None:
        raise ValueError(f"feature_layer={feature_layer} out of range for {num_layers} layers")
    if idx == 0:
        raise ValueError("feature_layer selects the embeddings, which this backend does not expose")
    return idx - 1


# ------------------------------------------------------------------------------------ hf
def _hf_classes(arch: str):
    import transformers as tf

    if arch == "siglip":
        return tf.SiglipVisionConfig, tf.SiglipVisionModel
    if arch == "clip":
        return tf.CLIPVisionConfig, tf.CLIPVisionModel
    if arch == "siglip2":
        return tf.Siglip2VisionConfig, tf.Siglip2VisionModel
    raise ValueError(f"unsupported hf vision arch {arch!r}; expected one of {HF_ARCHS}")


def _hf_arch_from_dir(path: Path) -> str:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"no config.json in {path}")
    model_type = json.loads(cfg_file.read_text()).get("model_type", "")
    for arch in ("siglip2", "siglip", "clip"):  # siglip2 before its prefix siglip
        if model_type.startswith(arch):
            return arch
    raise ValueError(f"{cfg_file}: model_type {model_type!r} is not a supported vision tower {HF_ARCHS}")


def _build_hf(cfg: VisionConfig):
    arch = _hf_arch_from_dir(Path(cfg.path)) if cfg.path else cfg.arch
    config_cls, model_cls = _hf_classes(arch)
    if cfg.path:
        model = model_cls.from_pretrained(cfg.path, local_files_only=True, **cfg.arch_kwargs)
    else:
        model = model_cls(config_cls(**cfg.arch_kwargs))
    mc = model.config
    if arch == "siglip2":
        side = int(round(mc.num_patches**0.5)) * mc.patch_size
    else:
        side = mc.image_size
    default_mean = (0.48145466, 0.4578275, 0.40821073) if arch == "clip" else (0.5, 0.5, 0.5)
    default_std = (0.26862954, 0.26130258, 0.27577711) if arch == "clip" else (0.5, 0.5, 0.5)
    pre = _Preprocess(side, (side, side), default_mean, default_std, "bicubic" if arch == "clip" else "bilinear")
    proc_file = Path(cfg.path) / "preprocessor_config.json" if cfg.path else None
    if proc_file is not None and proc_file.is_file():
        p = json.loads(proc_file.read_text())
        pre.mean = tuple(p.get("image_mean", pre.mean))
        pre.std = tuple(p.get("image_std", pre.std))
        pre.interpolation = _INTERPOLATIONS.get(p.get("resample"), pre.interpolation)
        size = p.get("size") or {}
        crop = p.get("crop_size") or {}
        if "height" in size:
            pre.resize = (size["height"], size["width"])
            pre.image_size = size["height"]
        elif "shortest_edge" in size:
            pre.resize = size["shortest_edge"]
            pre.image_size = crop.get("height", size["shortest_edge"]) if p.get("do_center_crop", True) else size["shortest_edge"]
    return model, arch, pre


# ------------------------------------------------------------------------------------ open_clip
def _register_open_clip_config(name: str, model_cfg: dict) -> None:
    """Make ``open_clip.create_model(name)`` know a custom architecture (a model-config dict)."""
    import open_clip

    folder = Path(tempfile.gettempdir()) / "mmdiff_open_clip_configs"
    folder.mkdir(parents=True, exist_ok=True)
    file = folder / f"{name}.json"
    text = json.dumps(model_cfg, sort_keys=True)
    changed = not file.is_file() or file.read_text() != text
    if changed:  # atomic write: parallel test workers may register the same name
        tmp = folder / f".{name}.{os.getpid()}.tmp"
        tmp.write_text(text)
        os.replace(tmp, file)
    if changed or name not in open_clip.list_models():
        open_clip.add_model_config(file)


def _build_open_clip(cfg: VisionConfig):
    import open_clip

    if cfg.arch_kwargs:
        _register_open_clip_config(cfg.arch, cfg.arch_kwargs)
    if cfg.path and Path(cfg.path).is_dir():
        clip = open_clip.create_model(f"local-dir:{cfg.path}")
    else:
        clip = open_clip.create_model(cfg.arch, pretrained=cfg.path, weights_only=True)
    pc = open_clip.get_model_preprocess_cfg(clip)
    visual = clip.visual
    del clip  # drop the text tower
    size = pc.get("size", visual.image_size)
    size = size[0] if isinstance(size, (list, tuple)) else size
    resize: int | tuple[int, int] = size if pc.get("resize_mode", "shortest") == "shortest" else (size, size)
    pre = _Preprocess(size, resize, tuple(pc["mean"]), tuple(pc["std"]), pc.get("interpolation", "bicubic"))
    return visual, pre


# ------------------------------------------------------------------------------------ timm
def _build_timm(cfg: VisionConfig):
    import timm

    kwargs = dict(num_classes=0, **cfg.arch_kwargs)
    if cfg.path and Path(cfg.path).is_dir():
        model = timm.create_model(f"local-dir:{cfg.path}", pretrained=True, **kwargs)
    elif cfg.path:
        model = timm.create_model(cfg.arch, pretrained=True, pretrained_cfg_overlay=dict(file=cfg.path), **kwargs)
    else:
        model = timm.create_model(cfg.arch, pretrained=False, **kwargs)
    if not hasattr(model, "forward_intermediates"):
        raise ValueError(f"timm model {cfg.arch!r} has no forward_intermediates; use a ViT-style model")
    dc = timm.data.resolve_model_data_config(model)
    img_size = getattr(model.patch_embed, "img_size", None)  # the built size wins over the pretrained cfg's
    side = int(img_size[-1]) if img_size is not None else dc["input_size"][-1]
    resize = int(side / dc.get("crop_pct", 1.0)) if dc.get("crop_mode", "center") == "center" else side
    pre = _Preprocess(side, resize, tuple(dc["mean"]), tuple(dc["std"]), dc.get("interpolation", "bicubic"))
    return model, pre


# ------------------------------------------------------------------------------------ adapter
class VisionEncoder(nn.Module):
    """(N, 3, H, W) normalised pixels -> (N, P, D) features of layer ``feature_layer``."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.hf_arch: str | None = None
        if config.backend == "hf":
            self.model, self.hf_arch, pre = _build_hf(config)
            mc = self.model.config
            self.hidden_size = mc.hidden_size
            self.num_layers = mc.num_hidden_layers
            self.patch_size = mc.patch_size
            self.num_prefix_tokens = 1 if self.hf_arch == "clip" else 0
        elif config.backend == "open_clip":
            self.model, pre = _build_open_clip(config)
            self.hidden_size = self.model.transformer.width
            self.num_layers = len(self.model.transformer.resblocks)
            self.patch_size = self.model.patch_size[0]
            self.num_prefix_tokens = 1  # open_clip's forward_intermediates splits off the class token
        elif config.backend == "timm":
            self.model, pre = _build_timm(config)
            self.hidden_size = self.model.embed_dim
            self.num_layers = len(self.model.blocks)
            self.patch_size = self.model.patch_embed.patch_size[0]
            self.num_prefix_tokens = self.model.num_prefix_tokens
        else:
            raise ValueError(f"unknown vision backend {config.backend!r}")
        if config.image_size is not None:
            pre.image_size, pre.resize = config.image_size, (config.image_size, config.image_size)
        if config.mean is not None:
            pre.mean = tuple(config.mean)
        if config.std is not None:
            pre.std = tuple(config.std)
        self.preprocess = pre
        if config.backend != "hf":
            _layer_to_block(config.feature_layer, self.num_layers)  # fail early on a bad index
        elif not -(self.num_layers + 1) <= config.feature_layer <= self.num_layers:
            raise ValueError(f"feature_layer={config.feature_layer} out of range for {self.num_layers} layers")
        self.set_frozen(config.freeze)

    # -------------------------------------------------------------- sizes
    @property
    def image_size(self) -> int:
        return self.preprocess.image_size

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Number of output tokens P of ``encode_images`` at ``image_size``."""
        extra = self.num_prefix_tokens if self.config.select == "cls_patch" else 0
        return self.grid_size**2 + extra

    # -------------------------------------------------------------- freezing
    def set_frozen(self, frozen: bool) -> None:
        """Frozen: no gradients, tower kept in eval mode (dropout off), features under no_grad."""
        self.frozen = frozen
        self.model.requires_grad_(not frozen)
        if frozen:
            self.model.eval()

    def train(self, mode: bool = True) -> "VisionEncoder":
        super().train(mode)
        if self.frozen:
            self.model.eval()
        return self

    # -------------------------------------------------------------- features
    def _hf_features(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        if self.hf_arch == "siglip2":
            n, c, h, w = x.shape
            p = self.patch_size
            gh, gw = h // p, w // p
            # (N, C, gh, p, gw, p) -> (N, gh, gw, p, p, C) -> (N, gh*gw, p*p*C), as Siglip2ImageProcessor
            patches = x.reshape(n, c, gh, p, gw, p).permute(0, 2, 4, 3, 5, 1).reshape(n, gh * gw, p * p * c)
            out = self.model(
                pixel_values=patches,
                pixel_attention_mask=torch.ones(n, gh * gw, dtype=torch.long, device=x.device),
                spatial_shapes=torch.tensor([[gh, gw]] * n, dtype=torch.long, device=x.device),
                output_hidden_states=True,
            )
        else:
            out = self.model(pixel_values=x, output_hidden_states=True)
        return out.hidden_states[self.config.feature_layer], self.num_prefix_tokens  # (N, T, D)

    def _open_clip_features(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        block = _layer_to_block(self.config.feature_layer, self.num_layers)
        out = self.model.forward_intermediates(
            x, indices=[block], stop_early=True, intermediates_only=True,
            output_fmt="NLC", output_extra_tokens=True,
        )
        patches = out["image_intermediates"][0]  # (N, P, D)
        prefix = out.get("image_intermediates_prefix", [patches[:, :0]])[0]  # (N, 1, D)
        return torch.cat([prefix, patches], dim=1), prefix.shape[1]

    def _timm_features(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        block = _layer_to_block(self.config.feature_layer, self.num_layers)
        out = self.model.forward_intermediates(
            x, indices=[block], return_prefix_tokens=True, norm=False,
            stop_early=True, output_fmt="NLC", intermediates_only=True,
        )
        patches, prefix = out[0]  # (N, P, D), (N, n_prefix, D)
        if prefix is None:
            prefix = patches[:, :0]
        return torch.cat([prefix, patches], dim=1), prefix.shape[1]

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalised images (N, 3, H, W) (see ``image_transform``) -> features (N, P, D)."""
        if pixel_values.dim() != 4:
            raise ValueError(f"expected (N, 3, H, W) pixel values, got {tuple(pixel_values.shape)}")
        x = pixel_values.to(dtype=next(self.model.parameters()).dtype)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            if self.config.backend == "hf":
                feats, n_prefix = self._hf_features(x)
            elif self.config.backend == "open_clip":
                feats, n_prefix = self._open_clip_features(x)
            else:
                feats, n_prefix = self._timm_features(x)
        if self.config.select == "patch":
            feats = feats[:, n_prefix:]  # drop CLS / register tokens
        return feats  # (N, P, D)

    forward = encode_images

    # -------------------------------------------------------------- preprocessing
    def image_transform(self):
        """torchvision transform PIL image -> normalised (3, S, S) tensor, as the encoder's processor."""
        from torchvision import transforms as T

        pre = self.preprocess
        interp = T.InterpolationMode(pre.interpolation) if pre.interpolation in {
            m.value for m in T.InterpolationMode} else T.InterpolationMode.BICUBIC
        return T.Compose([
            T.Lambda(lambda im: im.convert("RGB") if hasattr(im, "convert") else im),
            T.Resize(pre.resize, interpolation=interp),
            T.CenterCrop(pre.image_size),
            T.ToTensor(),
            T.Normalize(pre.mean, pre.std),
        ])

    # -------------------------------------------------------------- persistence
    def save_pretrained(self, directory: str | Path) -> None:
        """Write a folder that ``VisionConfig(backend, path=directory)`` loads (hf and timm).

        hf: ``save_pretrained`` (safetensors) + ``preprocessor_config.json``; timm: timm's
        ``config.json`` + ``model.safetensors``.  open_clip towers are loaded from the
        original CLIP checkpoint instead (a visual tower alone is not an open_clip checkpoint).
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        pre = self.preprocess
        if self.config.backend == "hf":
            self.model.save_pretrained(directory, safe_serialization=True)
            resample = {v: k for k, v in _INTERPOLATIONS.items()}.get(pre.interpolation, 3)
            size = ({"height": pre.resize[0], "width": pre.resize[1]} if isinstance(pre.resize, tuple)
                    else {"shortest_edge": pre.resize})
            proc = {"image_mean": list(pre.mean), "image_std": list(pre.std), "size": size,
                    "crop_size": {"height": pre.image_size, "width": pre.image_size},
                    "do_center_crop": not isinstance(pre.resize, tuple), "resample": resample}
            (directory / "preprocessor_config.json").write_text(json.dumps(proc, indent=2))
        elif self.config.backend == "timm":
            from timm.models import save_for_hf

            save_for_hf(self.model, str(directory), model_args=dict(self.config.arch_kwargs),
                        safe_serialization=True)
        else:
            raise NotImplementedError(
                "open_clip: keep the original CLIP checkpoint file and point VisionConfig.path at it"
            )


def build_vision_encoder(config: VisionConfig) -> VisionEncoder:
    """The factory used by the unified model."""
    return VisionEncoder(config)


def tiny_vision_config(backend: str = "siglip", **overrides) -> VisionConfig:
    """A random-weight tower small enough for CPU tests: 32x32 images, patch 8 (16 patches), width 32.

    ``backend``: "siglip", "siglip2", "clip" (transformers), "open_clip" or "timm".
    """
    hf_common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                     patch_size=8)
    if backend in ("siglip", "clip"):
        cfg = VisionConfig(backend="hf", arch=backend, arch_kwargs=dict(hf_common, image_size=32))
    elif backend == "siglip2":
        cfg = VisionConfig(backend="hf", arch="siglip2", arch_kwargs=dict(hf_common, num_patches=16))
    elif backend == "open_clip":
        model_cfg = {
            "embed_dim": 16,
            "vision_cfg": {"image_size": 32, "layers": 3, "width": 32, "head_width": 16, "patch_size": 8},
            "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
        }
        cfg = VisionConfig(backend="open_clip", arch="mmdiff-tiny-vit", arch_kwargs=model_cfg)
    elif backend == "timm":
        cfg = VisionConfig(backend="timm", arch="vit_tiny_patch16_224", arch_kwargs=dict(
            img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2))
    else:
        raise ValueError(f"unknown tiny vision backend {backend!r}")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    cfg.validate()
    return cfg
