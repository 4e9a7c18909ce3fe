"""A training recipe: one YAML file -> tokenizer, processor, model, data, objective, trainer.

    Recipe
      model:      named backbone size + overrides, text tokenizer dir, vision tower, projector,
                  VQ tokenizer dir, sequence layout (answer lengths), AR initialisation
      data:       shards and the task mixture
      objective:  mmdiff.diffusion.ObjectiveConfig (masked diffusion, AR, AR-then-diffusion, ...)
      train:      mmdiff.training.TrainConfig (optimiser, precision, checkpoints, staging)

``run_recipe(recipe)`` builds every part from the config (all validation happens before any
work starts), trains with the accelerate ``Trainer`` (re-running resumes), and exports the
final weights as a self-describing model directory ``<output_dir>/model`` that
``mmdiff.models.bundle.load_bundle`` (and ``mmdiff generate`` / ``mmdiff eval``) accept.

LLaVA-style staging is plain configuration: stage 1 sets ``train.trainable: [projector]`` with
the tower frozen; stage 2 sets ``train.init_from`` to stage 1's model directory, unfreezes the
tower (``model.vision.freeze: false``) and gives it its own learning rate with
``train.param_groups: {vision: 2.0e-6}``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch

from mmdiff.config import load_config
from mmdiff.data.pipeline import DataSource
from mmdiff.diffusion.objectives import TASK_KEYED, ObjectiveConfig, build_objective
from mmdiff.models.projector import ProjectorConfig
from mmdiff.models.unified import init_code_embeddings
from mmdiff.models.vision import VisionConfig
from mmdiff.processor import IMAGE_GEN, TASKS, UNDERSTANDING, ProcessorConfig
from mmdiff.text_tokenizer import SpecialTokens
from mmdiff.training.trainer import TrainConfig

__all__ = ["ModelRecipe", "DataRecipe", "Recipe", "load_recipe", "build_components", "run_recipe", "UnifiedLoss"]


@dataclass
class ModelRecipe:
    size: str = "debug"  # a name of mmdiff.models.sizes.SIZES, or a saved mmdiff model dir (its shape)
    backbone: dict[str, Any] = field(default_factory=dict)  # overrides of the named size
    attention_mode: Literal["bidirectional", "prefix", "causal"] = "bidirectional"
    tokenizer: str = ""  # text tokenizer directory (tokenizer.json)
    special_tokens: SpecialTokens = field(default_factory=SpecialTokens)
    vision: VisionConfig | None = None  # None: a text/t2i-only model
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    vq: str | None = None  # trained VQ tokenizer directory; needed for t2i / inpaint
    image_size: int = 32  # pixels fed to the VQ tokenizer
    answer_lengths: dict[str, int] = field(default_factory=lambda: dict(ProcessorConfig().answer_lengths))
    max_length: int = 256
    init_from_causal_lm: str | None = None  # local LLaMA/Qwen2 directory (AR init; its shape replaces `size`)
    add_missing_special_tokens: bool = False  # add special tokens absent from a real LM's tokenizer
    gradient_checkpointing: bool = False
    # a learned embedding per slot of the generated image's code grid (MMDiffForDiffusion.embed)
    code_position_embedding: bool = False
    # how a fresh model's VQ-code rows (input embeddings and output head) start: "random", or "vq":
    # the principal components of what each code looks like (VQTokenizer.code_features), so codes
    # that draw the same colour or shape start close and share what is learned about them.  With one
    # code per Shapes cell (a colour-shape pair at 4-9 offsets each), rows set this way when t2i
    # training started let 1,000 t2i steps put every attribute of a named object right for 0.32 of
    # objects instead of 0.005; set at build time, before stages that grow the output head's
    # code rows, it gave 0.014 (BENCHMARKS.md, session 11).  A run with train.init_from sets the rows
    # after loading those weights (at the loaded rows' scale); a resumed run leaves them.
    code_embedding_init: Literal["random", "vq"] = "random"
    # understanding rows also hold their input image's VQ codes as always-masked targets: the model
    # learns to write what each grid cell shows (mmdiff.processor; objective.image_codes.readout_weight).
    # Saved in the model's processor config, so generation and evaluation lay rows out the same way
    readout_codes: bool = False

    def validate(self) -> None:
        if not self.tokenizer:
            raise ValueError("tokenizer: a text tokenizer directory is required")
        if self.code_embedding_init not in ("random", "vq"):
            raise ValueError(f"code_embedding_init must be 'random' or 'vq', got {self.code_embedding_init!r}")
        if self.code_embedding_init == "vq" and not self.vq:
            raise ValueError("code_embedding_init: 'vq' needs model.vq (the tokenizer whose codes it reads)")
        if self.max_length < 8:
            raise ValueError(f"max_length must be >= 8, got {self.max_length}")
        if self.readout_codes and (not self.vq or self.vision is None):
            raise ValueError("readout_codes needs model.vq (the codes to read out) and model.vision (the image "
                             "they are read from)")


@dataclass
class DataRecipe:
    shards: list[str] = field(default_factory=list)
    task_weights: dict[str, float] = field(default_factory=lambda: {"caption": 1.0})
    shuffle_buffer: int = 1000
    num_workers: int = 0
    seed: int = 0
    max_bad_fraction: float = 0.05
    group_by_task: bool = False  # one task per batch: short-answer batches are not padded to t2i length
    # with group_by_task, "shared": every data-parallel rank draws the same task at the same step
    task_order: Literal["stream", "shared"] = "stream"
    caption_choice: Literal["random", "canonical"] = "random"  # caption target: any template / the canonical one
    prompt_choice: Literal["random", "canonical"] = "random"  # text-to-image prompt: any template / the canonical one
    qa_type_weights: dict[str, float] = field(default_factory=dict)  # VQA question types' relative odds (default 1)
    # curriculum: train only on samples whose canonical caption has at most this many words (0 = all).
    # Shapes scenes with one object have captions of 7-8 words, with two at least 15
    max_caption_words: int = 0
    # further streams mixed in, each {shards, weight, task_weights, max_caption_words}: ``weight``
    # samples of it for every sample of the main stream (mmdiff.data.pipeline.DataSource; no shards:
    # the main stream's), e.g. the captions of one-object scenes kept in the batches of an all-task stage
    sources: list[DataSource] = field(default_factory=list)
    # with group_by_task: a task's own *global* batch size (train.batch_size for the others), e.g.
    # {vqa: 48}: short rows in bigger batches.  task_weights stay sample proportions.
    task_batch_sizes: dict[str, int] = field(default_factory=dict)
    # per process (and data worker): megabytes of transformed input images and VQ codes kept across
    # epochs (ExampleEncoder); 0 = off.  For runs of many epochs over a small set.
    image_cache_mb: float = 0.0

    def validate(self) -> None:
        if not isinstance(self.max_caption_words, int) or self.max_caption_words < 0:
            raise ValueError(f"max_caption_words must be an integer >= 0 (0 = all samples), got {self.max_caption_words!r}")
        if self.image_cache_mb < 0:
            raise ValueError(f"image_cache_mb must be >= 0 (0 = off), got {self.image_cache_mb}")
        if not self.shards:
            raise ValueError("shards: at least one shard directory or .tar is required")
        for task, w in self.task_weights.items():
            if task not in TASKS:
                raise ValueError(f"task_weights: unknown task {task!r} (tasks: {', '.join(TASKS)})")
            if w < 0:
                raise ValueError(f"task_weights.{task} must be >= 0, got {w}")
        if not any(w > 0 for w in self.task_weights.values()):
            raise ValueError("task_weights: at least one task needs a positive weight")
        for qtype, w in self.qa_type_weights.items():
            if w < 0:
                raise ValueError(f"qa_type_weights.{qtype} must be >= 0, got {w}")
        for task, n in self.task_batch_sizes.items():
            if task not in TASKS:
                raise ValueError(f"task_batch_sizes: unknown task {task!r} (tasks: {', '.join(TASKS)})")
            if not isinstance(n, int) or n < 1:
                raise ValueError(f"task_batch_sizes.{task} must be an integer >= 1, got {n!r}")
        if self.task_batch_sizes and not self.group_by_task:
            raise ValueError("task_batch_sizes needs group_by_task: true (one task per batch)")


@dataclass
class Recipe:
    model: ModelRecipe = field(default_factory=ModelRecipe)
    data: DataRecipe = field(default_factory=DataRecipe)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        used = {t for t, w in self.data.task_weights.items() if w > 0}
        if used & UNDERSTANDING and self.model.vision is None:
            raise ValueError(f"data.task_weights uses {sorted(used & UNDERSTANDING)} but model.vision is not set")
        if used & IMAGE_GEN and not self.model.vq:
            raise ValueError(f"data.task_weights uses {sorted(used & IMAGE_GEN)} but model.vq is not set")
        if self.objective.image_codes.readout_given_prob > 0 and not self.model.readout_codes:
            raise ValueError("objective.image_codes.readout_given_prob shows read-out codes, but model.readout_codes "
                             "is false (the rows have none)")
        if self.model.backbone.get("shifted_logits") and self.objective.logits_are_shifted:
            raise ValueError("model.backbone.shifted_logits already realigns the logits; "
                             "objective.logits_are_shifted must then be false (it would shift twice)")
        if self.objective.name != "autoregressive" and self.model.attention_mode != self.objective.attention_mode:
            raise ValueError(
                f"model.attention_mode={self.model.attention_mode!r} (used when sampling) differs from "
                f"objective.attention_mode={self.objective.attention_mode!r} (used in training); set both"
            )
        if self.objective.name == "autoregressive" and self.model.attention_mode != "causal":
            raise ValueError("objective.name=autoregressive needs model.attention_mode=causal "
                             "(use ar_then_diffusion for the AR-then-diffusion curriculum)")
        if not self.objective.task_names:  # the recipe fills in every task: names must be tasks
            for key in TASK_KEYED:
                unknown = sorted(set(getattr(self.objective, key)) - set(TASKS))
                if unknown:
                    raise ValueError(f"objective.{key}: unknown task(s) {unknown} (tasks: {', '.join(TASKS)})")


def load_recipe(path: str | Path | None, overrides: list[str] | None = None,
                planned: tuple[str | Path, ...] = ()) -> Recipe:
    """YAML recipe + ``key=value`` overrides -> validated ``Recipe`` (errors name key and file).

    ``output_dir=DIR`` is accepted as a short form of ``train.output_dir=DIR``.  ``planned``: folders
    an earlier stage of a plan will write (``mmdiff.training.sequence``); an input path under one of
    them may not exist yet.
    """
    overrides = [("train." + o if o.split("=", 1)[0].strip() == "output_dir" else o) for o in (overrides or [])]
    recipe = load_config(Recipe, path, overrides)
    for p in [recipe.model.tokenizer, recipe.model.vq, *recipe.data.shards,
              *(s for src in recipe.data.sources for s in src.shards)]:
        if p and not Path(p).exists() and not any(_is_under(Path(p), Path(d)) for d in planned):
            raise FileNotFoundError(f"{path}: path does not exist: {p}")
    return recipe


def _is_under(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


# ------------------------------------------------------------------------------------ building


class _Identity:
    """Picklable no-op image transform: the encode function does the real transforms."""

    def __call__(self, image):
        return image


class ExampleEncoder:
    """``TaskExample`` -> ``Encoded``: vision transform for input images, VQ codes for targets.

    ``image_cache_mb > 0`` keeps the normalised input image and the VQ codes of each sample, keyed
    by (shard, sample key), up to that many megabytes (oldest dropped first): a run of several
    epochs over a small set (the quickstart reads its 6,000 scenes ~9 times) then transforms and
    VQ-encodes each image once.  Valid because both are pure functions of the image (the recipe's
    pipeline applies no random augmentation) and a sample key is unique within a shard.
    """

    def __init__(self, processor, vision_transform=None, vq=None, image_size: int = 32,
                 image_cache_mb: float = 0.0):
        self.processor = processor
        self.vision_transform = vision_transform
        self.vq = vq
        self.image_size = image_size
        self.pad_id = processor.pad_id
        self.image_cache_bytes = int(image_cache_mb * 2**20)
        self._cache: dict[tuple, torch.Tensor] = {}
        self._cache_bytes = 0
        self.cache_hits = self.cache_misses = 0

    def _cache_key(self, kind: str, ex) -> tuple | None:
        shard = ex.meta.get("shard") if isinstance(ex.meta, dict) else None
        if self.image_cache_bytes <= 0 or not shard or not ex.key:
            return None
        return (kind, shard, ex.key)

    def _cache_put(self, key: tuple | None, value: torch.Tensor) -> None:
        if key is None:
            return
        size = value.numel() * value.element_size()
        while self._cache and self._cache_bytes + size > self.image_cache_bytes:
            old = self._cache.pop(next(iter(self._cache)))
            self._cache_bytes -= old.numel() * old.element_size()
        if size <= self.image_cache_bytes:
            self._cache[key] = value
            self._cache_bytes += size

    def _cache_get(self, key: tuple | None) -> torch.Tensor | None:
        if key is None:
            return None
        hit = self._cache.get(key)
        if hit is None:
            self.cache_misses += 1
        else:
            self.cache_hits += 1
        return hit

    def _cached(self, kind: str, ex, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        key = self._cache_key(kind, ex)
        hit = self._cache_get(key)
        if hit is not None:
            return hit
        value = compute()
        self._cache_put(key, value)
        return value

    def _target_pixels(self, image) -> torch.Tensor:
        """A target image -> (3, image_size, image_size) float in [0, 1], the VQ's input."""
        from torchvision.transforms.functional import pil_to_tensor, resize

        x = pil_to_tensor(image.convert("RGB")).float().div(255.0)  # (3, H, W) in [0, 1]
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = resize(x, [self.image_size, self.image_size], antialias=True)
        return x

    def _codes(self, image) -> torch.Tensor:
        with torch.no_grad():
            return self.vq.encode_to_codes(self._target_pixels(image)[None])[0]  # (h, w)

    def __call__(self, ex) -> Any:
        return self._encode(ex, None)

    def _code_image(self, ex):
        """The image whose VQ codes ``ex``'s row holds: a t2i/inpaint target, or with the processor's
        ``readout_codes`` the input image of an understanding row (its read-out targets); else None."""
        if self.vq is None:
            return None
        if ex.task in IMAGE_GEN:
            return ex.target
        if ex.task in UNDERSTANDING and self.processor.cfg.readout_codes:
            return ex.image
        return None

    def _encode(self, ex, codes: torch.Tensor | None) -> Any:
        prompt = ex.prompt
        if isinstance(prompt, list):  # conversation turns [(role, text), ...]
            prompt = "\n".join(f"{role}: {text}" for role, text in prompt)
        image = self._code_image(ex)
        if codes is None and image is not None:
            codes = self._cached("codes", ex, lambda: self._codes(image))
        if ex.task in IMAGE_GEN:
            return self.processor.encode(ex.task, prompt=prompt or "", codes=codes, key=ex.key)
        pixel_values = None
        if ex.task in UNDERSTANDING:
            pixel_values = self._cached("pixels", ex, lambda: self.vision_transform(ex.image))
        return self.processor.encode(ex.task, prompt=prompt or "", target=ex.target,
                                     pixel_values=pixel_values, codes=codes, key=ex.key)

    def encode_many(self, examples: list) -> list:
        """Several examples at once -> one ``Encoded`` or the ``ValueError`` it raised, per example.

        The same results as calling the encoder on each, but the VQ encodes the text-to-image
        targets that are not cached in one batch: 32-px images cost ~3.9 ms each alone and ~0.25 ms
        each in a batch of 256 (one thread; BENCHMARKS.md).  The data pipeline calls this on chunks
        of its stream (``mmdiff.data.pipeline``'s encode stage), so no example changes place.
        """
        codes: dict[int, torch.Tensor] = {}
        todo: list[tuple[int, tuple | None, torch.Tensor]] = []
        failed: dict[int, ValueError] = {}
        for i, ex in enumerate(examples):
            image = self._code_image(ex)
            if image is None:
                continue
            key = self._cache_key("codes", ex)
            hit = self._cache_get(key)
            if hit is not None:
                codes[i] = hit
                continue
            try:
                todo.append((i, key, self._target_pixels(image)))
            except (OSError, ValueError, TypeError, AttributeError) as e:  # an unreadable target: this example only
                what = "target" if ex.task in IMAGE_GEN else "input"
                failed[i] = ValueError(f"{what} image: {type(e).__name__}: {e}")
        if todo:
            with torch.no_grad():
                batch = self.vq.encode_to_codes(torch.stack([x for _, _, x in todo]))  # (n, h, w)
            for (i, key, _), c in zip(todo, batch):
                c = c.clone()  # its own storage: a cached row must not keep the whole batch alive
                codes[i] = c
                self._cache_put(key, c)
        out: list = []
        for i, ex in enumerate(examples):
            if i in failed:
                out.append(failed[i])
                continue
            try:
                out.append(self._encode(ex, codes.get(i)))
            except ValueError as e:
                out.append(e)
        return out


@dataclass
class UnifiedLoss:
    """``loss_fn(model, batch, step, generator)`` for the Trainer: objective over the unified model."""

    objective: Any

    MODEL_KEYS = ("image_slots", "pixel_values")
    BATCH_KEYS = ("input_ids", "attention_mask", "target_mask", "prompt_mask", "image_code_mask", "task_ids")

    def __call__(self, model, batch: dict, step: int, generator: torch.Generator | None):
        self.objective.set_step(step)
        b = {k: batch[k] for k in (*self.BATCH_KEYS, *self.MODEL_KEYS) if batch.get(k) is not None}

        if batch.get("image_code_mask") is not None:  # an extra the objective passes through (and doubles)
            from mmdiff.models.unified import code_index

            b["image_code_index"] = code_index(batch["image_code_mask"])

        def model_fn(ids, attention_mask, attention_mode, prompt_mask, image_slots=None, pixel_values=None,
                     image_code_index=None, **_):
            return model(input_ids=ids, attention_mask=attention_mask, attention_mode=attention_mode,
                         prompt_mask=prompt_mask, image_slots=image_slots, pixel_values=pixel_values,
                         image_code_index=image_code_index).logits

        out = self.objective(model_fn, b, generator)
        metrics = dict(out.metrics)
        metrics["mask_ratio"] = out.mask_ratio
        return {"loss": out.loss, "metrics": metrics, "per_task": out.per_task_loss}


@dataclass
class Components:
    recipe: Recipe
    tokenizer: Any
    processor: Any
    model: Any
    vq: Any
    encoder: ExampleEncoder
    objective: Any


_CONFIG_META = ("transformers_version", "architectures", "model_type", "_name_or_path", "dtype", "torch_dtype",
                "output_hidden_states", "return_dict", "use_cache", "id2label", "label2id", "problem_type",
                "chunk_size_feed_forward", "is_encoder_decoder", "tie_encoder_decoder", "output_attentions")


def _backbone_config(recipe: Recipe, vocab: int, ids: dict[str, int]) -> tuple[dict, Any]:
    """Backbone fields: the named size, or the causal LM's own shape when initialising from one."""
    from mmdiff.models import MDiffModel, get_size

    m = recipe.model
    lm = None
    if m.init_from_causal_lm:
        lm = MDiffModel.from_causal_lm(m.init_from_causal_lm)
        backbone = {k: v for k, v in lm.config.to_dict().items() if k not in _CONFIG_META}
        backbone.update(m.backbone)
    elif (Path(m.size) / "config.json").is_file():  # the shape of a saved mmdiff model (stage 2)
        saved = json.loads((Path(m.size) / "config.json").read_text())
        if "backbone" not in saved:
            raise ValueError(f"model.size: {m.size}/config.json is not an mmdiff model config (no 'backbone')")
        backbone = {**saved["backbone"], **m.backbone}
    else:
        backbone = get_size(m.size, **m.backbone)
    backbone.update(vocab_size=vocab, attention_mode=m.attention_mode, mask_token_id=ids["mask"],
                    pad_token_id=ids["pad"], eos_token_id=ids["eos"], bos_token_id=ids["bos"])
    return backbone, lm


def _build_model(recipe: Recipe, text_vocab: int, codebook: int, proc_cfg: ProcessorConfig, special: SpecialTokens,
                 ids: dict[str, int]):
    from mmdiff.models import MMDiffConfig, MMDiffForDiffusion
    from mmdiff.models.vision import build_vision_encoder

    m = recipe.model
    torch.manual_seed(recipe.train.seed)  # the same recipe builds the same initial weights
    vocab = text_vocab + codebook
    backbone, lm = _backbone_config(recipe, vocab, ids)
    vision = build_vision_encoder(m.vision) if m.vision is not None else None
    cfg = MMDiffConfig(backbone=backbone, projector=dataclasses.asdict(m.projector),
                       special_tokens=dataclasses.asdict(special), text_vocab_size=text_vocab,
                       codebook_size=codebook,
                       code_positions=proc_cfg.code_grid[0] * proc_cfg.code_grid[1] if m.code_position_embedding else 0)
    model = MMDiffForDiffusion(cfg, vision_encoder=vision)
    if lm is not None:  # AR initialisation: the LM's weights, its vocabulary grown by specials + codebook
        lm.resize_token_embeddings(vocab)
        model.backbone.load_state_dict(lm.state_dict(), strict=True)
        del lm
    proc_cfg = dataclasses.replace(proc_cfg, num_image_tokens=model.num_image_tokens)
    cfg.processor = dataclasses.asdict(proc_cfg)
    if m.gradient_checkpointing:
        model.backbone.activation_checkpointing_enable()
    return model, proc_cfg


def build_components(recipe: Recipe) -> Components:
    """Everything a run needs, built and cross-checked before any training step."""
    from mmdiff.processor import MMProcessor
    from mmdiff.text_tokenizer import load_text_tokenizer, special_ids

    m = recipe.model
    tokenizer = load_text_tokenizer(m.tokenizer, m.special_tokens, add_missing=m.add_missing_special_tokens)
    ids = special_ids(tokenizer, m.special_tokens)
    vq = None
    code_grid, codebook = (1, 1), 0
    if m.vq:
        from mmdiff.models.vq import VQTokenizer

        vq = VQTokenizer.from_pretrained(m.vq).eval()
        vq.requires_grad_(False)
        code_grid, codebook = tuple(vq.grid_size(m.image_size)), vq.codebook_size
    proc_cfg = ProcessorConfig(num_image_tokens=0, code_grid=code_grid, codebook_size=codebook,
                               max_length=m.max_length, answer_lengths=dict(m.answer_lengths),
                               readout_codes=m.readout_codes)
    model, proc_cfg = _build_model(recipe, len(tokenizer), codebook, proc_cfg, m.special_tokens, ids)
    if m.code_embedding_init == "vq":  # a fresh model's code rows (with train.init_from: again after loading)
        init_code_embeddings(model, vq.code_features(), text_vocab_size=len(tokenizer))
    processor = MMProcessor(tokenizer, m.special_tokens, proc_cfg)
    transform = model.vision.image_transform() if model.vision is not None else None
    if model.projector is not None and m.projector.whiten_inputs and not recipe.train.init_from:
        fit_input_whitening(model, recipe.data.shards, transform)  # a fresh model; init_from brings its own
    encoder = ExampleEncoder(processor, transform, vq, m.image_size, image_cache_mb=recipe.data.image_cache_mb)
    ocfg = dataclasses.replace(recipe.objective, task_names=list(TASKS)) if not recipe.objective.task_names \
        else recipe.objective
    keep = [ids[k] for k in ("bos", "user", "assistant", "image_start", "image_end", "image", "eos")]
    objective = build_objective(ocfg, mask_token_id=ids["mask"], keep_token_ids=keep)
    return Components(recipe, tokenizer, processor, model, vq, encoder, objective)


WHITENING_IMAGES = 512  # sample images for the projector's input whitening (x the tower's tokens each)


def fit_input_whitening(model, shards, transform, images: int = WHITENING_IMAGES) -> dict:
    """Fit the projector's input whitening on the tower's features of the first ``images`` images of
    ``shards`` (in shard order: every rank of a run computes the same statistics)."""
    from mmdiff.data.shards import read_samples

    pixels = []
    for sample in read_samples(shards):
        if sample.image is not None:
            pixels.append(transform(sample.image.convert("RGB")))
            if len(pixels) >= images:
                break
    if not pixels:
        raise ValueError(f"model.projector.whiten_inputs: no images in data.shards {list(shards)} to fit it on")
    was_training = model.vision.training
    model.vision.eval()
    with torch.no_grad():
        feats = torch.cat([model.vision.encode_images(torch.stack(pixels[i:i + 128]))
                           for i in range(0, len(pixels), 128)])
    model.vision.train(was_training)
    return {"images": len(pixels), **model.projector.fit_whitening(feats)}


class PipelineSource:
    """The trainer's resumable data source over the webdataset pipeline (resampled, seeded)."""

    def __init__(self, recipe: Recipe, encoder: ExampleEncoder, micro_batch: int):
        self.recipe, self.encoder, self.micro_batch = recipe, encoder, micro_batch
        self._loader = None

    def _factory(self, rank: int, world_size: int, epoch: int):
        from mmdiff.data.pipeline import PipelineConfig, build_dataloader

        d = self.recipe.data
        share = self.recipe.train.batch_size // self.micro_batch  # ranks x accumulation steps
        task_sizes = {}
        for task, n in d.task_batch_sizes.items():
            if n % share:
                raise ValueError(f"data.task_batch_sizes.{task}={n} is not divisible by world_size x "
                                 f"grad_accum_steps = {share}")
            task_sizes[task] = n // share
        cfg = PipelineConfig(shards=list(d.shards), batch_size=self.micro_batch, shuffle_buffer=d.shuffle_buffer,
                             num_workers=d.num_workers, resampled=True, seed=d.seed, epoch=epoch,
                             max_bad_fraction=d.max_bad_fraction, task_weights=dict(d.task_weights),
                             max_length=self.recipe.model.max_length, group_by_task=d.group_by_task,
                             task_order=d.task_order, caption_choice=d.caption_choice,
                             prompt_choice=d.prompt_choice,
                             qa_type_weights=dict(d.qa_type_weights),
                             max_caption_words=d.max_caption_words,
                             sources=list(d.sources),
                             task_batch_sizes=task_sizes)
        self._loader = build_dataloader(cfg, self.encoder, transform=_Identity(), pad_id=self.encoder.pad_id,
                                        rank=rank, world_size=world_size)
        return self._loader

    def iterator(self, start_batch: int, rank: int, world_size: int):
        from mmdiff.training.data_state import SkippingDataSource

        return SkippingDataSource(self._factory).iterator(start_batch, rank, world_size)

    def stats(self) -> dict:
        return self._loader.stats.as_dict() if self._loader is not None else {}


def export_model(components: Components, output_dir: str | Path) -> Path:
    from mmdiff.models.bundle import save_bundle

    out = Path(output_dir) / "model"
    tmp = out.with_name(".tmp-model")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    save_bundle(tmp, components.model, components.tokenizer, components.vq)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return out


def run_recipe(recipe: Recipe, accelerator: Any = None) -> dict:
    """Build, train (or resume), export ``<output_dir>/model``; a JSON-able summary."""
    from mmdiff.config import save_config
    from mmdiff.training.trainer import Trainer

    comps = build_components(recipe)
    out_dir = Path(recipe.train.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(recipe, out_dir / "recipe.yaml")
    after_init = None
    if recipe.model.code_embedding_init == "vq":  # code rows from the VQ once init_from's weights are in
        features, v = comps.vq.code_features(), comps.processor.text_vocab_size
        after_init = lambda model: init_code_embeddings(model, features, text_vocab_size=v)  # noqa: E731
    trainer = Trainer(recipe.train, comps.model, UnifiedLoss(comps.objective),
                      PipelineSource(recipe, comps.encoder, 1), accelerator=accelerator, after_init=after_init)
    trainer.data_source.micro_batch = trainer.micro_batch_size
    result = trainer.train()
    model_dir = None
    if trainer.accelerator.is_main_process:
        comps.model = trainer.unwrapped
        # with train.ema_decay the exported model holds the EMA weights (the raw ones stay in the checkpoints)
        with trainer.ema.swapped(comps.model) if trainer.ema is not None else contextlib.nullcontext():
            model_dir = export_model(comps, out_dir)
    trainer.accelerator.wait_for_everyone()
    (out_dir / "history.json").write_text(json.dumps(result.get("history", [])))
    return {"step": result["step"], "loss": result["loss"], "output_dir": str(out_dir),
            "model_dir": str(model_dir) if model_dir else str(out_dir / "model"),
            "model_weights": "ema" if trainer.ema is not None else "raw",
            "resumed_from": result.get("resumed_from"), "steps_run": result.get("steps_run"),
            "elapsed_s": round(result.get("elapsed_s", 0.0), 2)}
