"""A model directory: everything needed to generate and evaluate, in one folder.

    <dir>/config.json, model.safetensors     MMDiffForDiffusion (backbone + projector + vision tower)
    <dir>/tokenizer.json, tokenizer_config.json, special_tokens_map.json   the text tokenizer
    <dir>/vq/                                the VQ image tokenizer (diffusers VQModel format), optional

The processor layout (``ProcessorConfig``) and the special-token strings live inside
``config.json`` (``processor``, ``special_tokens``), so a directory is self-describing:
``load_bundle(dir)`` rebuilds model, tokenizer, processor, VQ tokenizer and the vision
transform with no other input.  Weights load from safetensors only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmdiff.config import from_dict
from mmdiff.models.unified import MMDiffForDiffusion
from mmdiff.processor import MMProcessor, ProcessorConfig

__all__ = ["Bundle", "load_bundle", "save_bundle"]


@dataclass
class Bundle:
    model: MMDiffForDiffusion
    tokenizer: Any
    processor: MMProcessor
    vq: Any | None  # mmdiff.models.vq.VQTokenizer
    image_transform: Any | None  # PIL -> (3, H, W) tensor for the vision encoder
    path: Path | None = None

    def to(self, device: str | torch.device) -> "Bundle":
        self.model.to(device)
        if self.vq is not None:
            self.vq.to(device)
        return self


def save_bundle(directory: str | Path, model: MMDiffForDiffusion, tokenizer: Any, vq: Any | None = None) -> Path:
    """Write model, tokenizer and VQ tokenizer into ``directory`` (created)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    if vq is not None:
        vq.save_pretrained(directory / "vq")
    return directory


def _check_dir(directory: Path) -> None:
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory not found: {directory}")
    for name in ("config.json", "tokenizer.json"):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory} is not an mmdiff model directory: {name} is missing")
    if not any(directory.glob("*.safetensors")):
        raise FileNotFoundError(f"{directory}: no .safetensors weights (refusing to build random weights)")


def load_bundle(directory: str | Path, device: str | torch.device = "cpu",
                dtype: torch.dtype | None = None) -> Bundle:
    """Load a model directory written by ``save_bundle`` (or by training)."""
    from mmdiff.text_tokenizer import SpecialTokens, load_text_tokenizer

    directory = Path(directory)
    _check_dir(directory)
    model = MMDiffForDiffusion.from_pretrained(directory, local_files_only=True, use_safetensors=True)
    if dtype is not None:
        model.to(dtype)
    model.eval()
    special = from_dict(SpecialTokens, model.config.special_tokens) if model.config.special_tokens else SpecialTokens()
    tokenizer = load_text_tokenizer(directory, special)
    proc_cfg = from_dict(ProcessorConfig, {
        k: (tuple(v) if k == "code_grid" else v) for k, v in (model.config.processor or {}).items()
    })
    processor = MMProcessor(tokenizer, special, proc_cfg)
    expected = model.backbone.config.vocab_size
    if processor.vocab_size != expected:
        raise ValueError(
            f"{directory}: tokenizer ({processor.text_vocab_size}) + codebook ({proc_cfg.codebook_size}) "
            f"= {processor.vocab_size} tokens, but the model's vocab_size is {expected}"
        )
    vq = None
    if (directory / "vq").is_dir():
        from mmdiff.models.vq import VQTokenizer

        vq = VQTokenizer.from_pretrained(directory / "vq").eval()
    transform = model.vision.image_transform() if model.vision is not None else None
    return Bundle(model, tokenizer, processor, vq, transform, directory).to(device)


def processor_config_dict(cfg: ProcessorConfig) -> dict:
    d = dataclasses.asdict(cfg)
    d["code_grid"] = list(d["code_grid"])
    return d
