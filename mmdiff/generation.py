"""Generation entry points: a loaded model directory (``Bundle``) in, text or images out.

    from mmdiff.models.bundle import load_bundle
    from mmdiff.generation import answer, caption, describe, generate_text, text_to_image

    bundle = load_bundle("runs/shapes/model")
    caption(bundle, "scene.png").text                       # one image  -> one TextResult
    [r.text for r in caption(bundle, ["a.png", "b.png"])]   # a list     -> a list, ONE batched call
    answer(bundle, "scene.png", "what color is the circle?").text
    text_to_image(bundle, "a red circle", generator=0).image  # PIL.Image

Every function is a thin layer over the library: the processor lays out the canvas
(``MMProcessor.generation_inputs`` + ``collate(left_pad=True)``), the ONE sampling engine
(:mod:`mmdiff.sampling`) fills it, and the result is decoded (``decode_text`` / the VQ decoder).
Nothing here samples on its own.

Pinned defaults
---------------
``DEFAULT_SETTINGS[task]`` holds the sampler settings each task uses unless the caller passes
``sampler=`` (a full :class:`SamplerConfig`) or overrides ``gen_length`` / ``block_length`` /
``steps``.  Text tasks decode greedily (temperature 0) and commit by confidence, one token per
step (``steps = gen_length``, LLaDA's quality setting), in blocks of 8 where 8 divides the
generation length (whole canvas otherwise; VQA always whole canvas: 4 tokens).  Text-to-image
draws tokens at temperature 1 and commits by confidence with threshold decoding inside a budget
of 16 steps (``threshold_schedule``, τ 0.7, cosine floor): the sure positions (blank background)
go in the first passes and the uncertain ones (object edges) are spread over the rest; image
classifier-free guidance 0.5 against the *empty-prompt* layout (``generation_inputs("t2i", "")``,
passed to the engine as ``uncond_batch``).  On the Shapes world this gave ShapesEval 0.30 at
~8.5 passes where MaskGIT's fixed cosine split with Gumbel-confidence and CFG 3.0 gave 0.00
(BENCHMARKS.md, session 8).

Vocabulary restriction: text positions only produce text ids (< V_text), image-code positions
only code ids, and text outputs never produce template specials (bos, pad, role and image
markers); EOS is allowed and the output is cut at the first EOS.

Timing fields: ``seconds`` is the wall time of the batched call that produced a result (shared by
every result of one call); ``nfe`` its forward passes; ``tokens_per_second`` =
``num_tokens / seconds`` for that row.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence, Union

import torch
from torch import Tensor

from mmdiff.diffusion.schedules import ScheduleConfig
from mmdiff.processor import TASK_PROMPTS, Encoded, MMProcessor
from mmdiff.sampling import GuidanceConfig, SampleOutput, SamplerConfig, build_sampler

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image as PILImage

    from mmdiff.models.bundle import Bundle

__all__ = [
    "DEFAULT_SETTINGS",
    "TaskDefaults",
    "DEFAULT",
    "resolve_settings",
    "TextResult",
    "ImageResult",
    "generate_text",
    "answer",
    "caption",
    "describe",
    "text_to_image",
    "load_image",
    "as_generator",
    "check_text",
    "layout_canvas",
    "context_limit",
    "codes_to_pil",
]

ImageInput = Union[str, Path, "PILImage.Image"]

#: Template specials a text output never contains (EOS excepted: it ends the output).
_TEXT_BANNED_ROLES = ("pad", "bos", "image_start", "image_end", "image", "user", "assistant")
#: Template tokens the empty-prompt (unconditional) rows keep.
_KEEP_ROLES = ("bos", "user", "assistant", "image_start", "image_end")
#: The default block size of semi-autoregressive text decoding (used when it divides gen_length).
TEXT_BLOCK_LENGTH = 8
#: Image classifier-free guidance scale g of Muse's (1 + g) c - g u.
T2I_GUIDANCE = 0.5
#: Confidence threshold of text-to-image's threshold decoding (``threshold_schedule``).
T2I_THRESHOLD = 0.7
T2I_STEPS = 16


# --------------------------------------------------------------------------------------------
# Defaults
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskDefaults:
    """The pinned settings of one task.

    gen_length: tokens to generate (None: the processor's ``answer_lengths[task]``, the length
        the model was trained to fill).  block_length: semi-autoregressive block (None: whole
        canvas; used only when it divides gen_length).  steps: sampling steps (None: one token
        per step, = gen_length).  sampler: everything else.
    """

    gen_length: int | None
    block_length: int | None
    steps: int | None
    sampler: SamplerConfig


def _text_sampler() -> SamplerConfig:
    return SamplerConfig(score="confidence", transfer="schedule", temperature=0.0, stop_at_eos=True)


DEFAULT_SETTINGS: dict[str, TaskDefaults] = {
    "text": TaskDefaults(gen_length=None, block_length=TEXT_BLOCK_LENGTH, steps=None, sampler=_text_sampler()),
    # short answers in one pass: recipes train VQA with the answer wholly hidden
    # (task_min_mask_ratio: {vqa: 1.0}), so the all-masked canvas is the one state the model
    # knows; committing a word first and re-predicting the rest puts it in states it never saw
    # (a session-11 model then filled the EOS slots with words: "greensmallsmallsmall", VQA 0.11
    # instead of 0.59).  With more steps, EOS is committed last, after the answer's words (LLaDA).
    "vqa": TaskDefaults(gen_length=4, block_length=None, steps=1,
                        sampler=dataclasses.replace(_text_sampler(), suppress_eos_confidence=True)),
    "caption": TaskDefaults(gen_length=None, block_length=TEXT_BLOCK_LENGTH, steps=None, sampler=_text_sampler()),
    "describe": TaskDefaults(gen_length=None, block_length=TEXT_BLOCK_LENGTH, steps=None, sampler=_text_sampler()),
    "t2i": TaskDefaults(
        gen_length=None,  # the code grid h * w
        block_length=None,
        steps=T2I_STEPS,
        sampler=SamplerConfig(
            steps=T2I_STEPS,
            schedule=ScheduleConfig(name="cosine"),
            score="confidence",
            transfer="threshold_schedule",
            threshold=T2I_THRESHOLD,
            temperature=1.0,
            guidance=GuidanceConfig(image_scale=T2I_GUIDANCE, image_uncond="empty_prompt"),
        ),
    ),
}


class _Default:
    """Sentinel: 'use the task default' where None already means something (block_length)."""

    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT = _Default()


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------
@dataclass
class TextResult:
    """One generated text.  token_ids: the generated ids, cut before the first EOS."""

    text: str
    token_ids: list[int]
    nfe: int
    seconds: float
    task: str

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def tokens_per_second(self) -> float:
        return self.num_tokens / self.seconds if self.seconds > 0 else float("inf")


@dataclass
class ImageResult:
    """One generated image.  codes: (h, w) long VQ codes; image: the decoded PIL RGB image."""

    image: "PILImage.Image"
    codes: Tensor
    nfe: int
    seconds: float
    task: str = "t2i"


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------
def as_generator(generator: torch.Generator | int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A ``torch.Generator``: passed through, seeded from an int, or None (global RNG)."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, bool) or not isinstance(generator, int):
        raise ValueError(f"generator must be a torch.Generator, an int seed or None, got {type(generator).__name__}")
    return torch.Generator(device=device).manual_seed(generator)


def load_image(image: ImageInput, name: str = "image") -> "PILImage.Image":
    """A PIL RGB image from a PIL image, an (H, W, 3) uint8 array or a path; errors name the argument."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"{name}: an array image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
        return Image.fromarray(image, "RGB")
    if not isinstance(image, (str, Path)):
        raise ValueError(f"{name} must be a PIL image, an (H, W, 3) uint8 array or a file path, "
                         f"got {type(image).__name__}")
    path = Path(image)
    if not path.is_file():
        raise FileNotFoundError(f"{name}: image file not found: {path}")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ValueError(f"{name}: cannot read image file {path}: {e}") from e


def check_text(value: Any, name: str) -> str:
    """``value`` if it is a non-empty string; else a ValueError naming ``name``."""
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{name} must not be empty")
    return value


def _as_list(value: Any) -> tuple[list, bool]:
    """(items, was_a_list)."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError("got an empty list of inputs")
        return list(value), True
    return [value], False


def _broadcast(a: list, b: list, name_a: str, name_b: str) -> tuple[list, list]:
    if len(a) == len(b):
        return a, b
    if len(a) == 1:
        return a * len(b), b
    if len(b) == 1:
        return a, b * len(a)
    raise ValueError(f"{name_a} ({len(a)} items) and {name_b} ({len(b)} items) must have the same length")


# --------------------------------------------------------------------------------------------
# Layout and settings
# --------------------------------------------------------------------------------------------
def context_limit(processor: MMProcessor, model: Any) -> tuple[int, str]:
    """(the longest sequence the model takes, a description of where the limit comes from)."""
    proc_max = processor.cfg.max_length
    backbone = getattr(model, "backbone", model)
    pos_max = getattr(getattr(backbone, "config", None), "max_position_embeddings", None) or proc_max
    limit = min(proc_max, pos_max)
    return limit, f"processor max_length={proc_max}, backbone max_position_embeddings={pos_max}"


def layout_canvas(processor: MMProcessor, model: Any, task: str, prompt: str, name: str = "prompt",
                  pixel_values: Tensor | None = None, gen_length: int | None = None) -> Encoded:
    """The canvas of one item (``processor.generation_inputs``), checked against the model context
    (``processor.cfg.max_length`` and the backbone's ``max_position_embeddings``) with an error
    that names the argument ``name``."""
    unbounded = copy.copy(processor)  # lay out first, then check against the real context below
    unbounded.cfg = dataclasses.replace(processor.cfg, max_length=sys.maxsize)
    enc = unbounded.generation_inputs(task, prompt, pixel_values=pixel_values, gen_length=gen_length)
    limit, where = context_limit(processor, model)
    total = len(enc.input_ids)
    if total > limit:
        n_gen = int(enc.target_mask.sum())
        raise ValueError(
            f"{name} is too long: {total - n_gen} prompt tokens + {n_gen} generated tokens = {total} "
            f"> the model context {limit} ({where})"
        )
    return enc


def resolve_settings(
    task: str,
    processor: MMProcessor,
    gen_length: int | None = None,
    block_length: int | None | _Default = DEFAULT,
    steps: int | None = None,
    sampler: SamplerConfig | None = None,
) -> tuple[int, SamplerConfig]:
    """(gen_length, a validated sampler config) for ``task``.

    Precedence: explicit arguments > ``sampler`` > ``DEFAULT_SETTINGS[task]``.  ``block_length``
    DEFAULT means the sampler's value, or the task default (used only when it divides
    gen_length); None means the whole canvas.  Errors name the bad argument.
    """
    if task not in DEFAULT_SETTINGS:
        raise ValueError(f"task must be one of {sorted(DEFAULT_SETTINGS)}, got {task!r}")
    d = DEFAULT_SETTINGS[task]
    if gen_length is None:
        gen_length = d.gen_length if d.gen_length is not None else processor.cfg.answer_lengths.get(task, 0)
    if isinstance(gen_length, bool) or not isinstance(gen_length, int) or gen_length < 1:
        raise ValueError(f"gen_length must be a positive int, got {gen_length!r}")
    if sampler is not None:
        if not isinstance(sampler, SamplerConfig):
            raise ValueError(f"sampler must be a SamplerConfig or None, got {type(sampler).__name__}")
        cfg = copy.deepcopy(sampler)
        bl = cfg.block_length if block_length is DEFAULT else block_length
        st = cfg.steps if steps is None else steps
    else:
        cfg = copy.deepcopy(d.sampler)
        if block_length is DEFAULT:
            bl = d.block_length if d.block_length is not None and gen_length % d.block_length == 0 else None
        else:
            bl = block_length
        st = steps if steps is not None else (d.steps if d.steps is not None else gen_length)
    if bl is not None and (isinstance(bl, bool) or not isinstance(bl, int) or bl < 1):
        raise ValueError(f"block_length must be a positive int or None (whole canvas), got {bl!r}")
    if isinstance(st, bool) or not isinstance(st, int) or st < 1:
        raise ValueError(f"steps must be a positive int, got {st!r}")
    if bl is not None and gen_length % bl:
        raise ValueError(f"gen_length={gen_length} is not divisible by block_length={bl}")
    num_blocks = 1 if bl is None else gen_length // bl
    if cfg.transfer == "schedule":
        if st < num_blocks:
            raise ValueError(
                f"steps={st} < the number of blocks {num_blocks} (gen_length {gen_length} / block_length {bl}); "
                "every block needs at least one step"
            )
        if st % num_blocks:
            raise ValueError(
                f"steps={st} is not divisible by the number of blocks {num_blocks} "
                f"(gen_length {gen_length} / block_length {bl})"
            )
    cfg.block_length, cfg.steps = bl, st
    cfg.validate()
    return gen_length, cfg


def _device(bundle: "Bundle") -> torch.device:
    return next(bundle.model.parameters()).device


def _run(bundle: "Bundle", items: list[Encoded], cfg: SamplerConfig, generator, *, text: bool,
         uncond_items: list[Encoded] | None = None) -> tuple[SampleOutput, dict, float]:
    """Collate, sample; returns (output, batch, seconds)."""
    proc = bundle.processor
    dev = _device(bundle)
    start = time.perf_counter()
    batch = proc.collate(items, left_pad=True)
    uncond = None
    if uncond_items is not None:
        uncond = proc.collate(uncond_items, left_pad=True, pad_to=batch["input_ids"].shape[1])
        uncond = {k: v.to(dev) for k, v in uncond.items() if isinstance(v, Tensor)}
    ids = proc.ids
    out = build_sampler(cfg).generate(
        bundle.model,
        batch,
        as_generator(generator, dev),
        mask_token_id=proc.mask_id,
        eos_token_id=proc.eos_id,
        text_vocab_size=proc.text_vocab_size,
        banned_token_ids=[ids[r] for r in _TEXT_BANNED_ROLES if r in ids] if text else (),
        keep_token_ids=[ids[r] for r in _KEEP_ROLES if r in ids],
        pad_token_id=proc.pad_id,
        uncond_batch=uncond,
    )
    return out, batch, time.perf_counter() - start


def _text_results(bundle: "Bundle", task: str, out: SampleOutput, seconds: float) -> list[TextResult]:
    return [
        TextResult(text=bundle.processor.decode_text(ids), token_ids=list(ids), nfe=out.nfe,
                   seconds=seconds, task=task)
        for ids in out.generated
    ]


# --------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------
def generate_text(
    bundle: "Bundle",
    prompt: str | Sequence[str],
    gen_length: int | None = None,
    block_length: int | None | _Default = DEFAULT,
    steps: int | None = None,
    sampler: SamplerConfig | None = None,
    generator: torch.Generator | int | None = None,
) -> TextResult | list[TextResult]:
    """Text continuation / answer to ``prompt`` (one string or a list, sampled as one batch).

    gen_length: tokens to generate (default: the processor's ``answer_lengths["text"]``);
    block_length: semi-autoregressive block (None: whole canvas; default 8 when it divides
    gen_length); steps: default gen_length.  ``sampler`` replaces ``DEFAULT_SETTINGS["text"]``.
    """
    prompts, many = _as_list(prompt)
    prompts = [check_text(p, "prompt") for p in prompts]
    n, cfg = resolve_settings("text", bundle.processor, gen_length, block_length, steps, sampler)
    items = [layout_canvas(bundle.processor, bundle.model, "text", p, "prompt", gen_length=n) for p in prompts]
    out, _, seconds = _run(bundle, items, cfg, generator, text=True)
    results = _text_results(bundle, "text", out, seconds)
    return results if many else results[0]


# --------------------------------------------------------------------------------------------
# Understanding: VQA, captions, descriptions
# --------------------------------------------------------------------------------------------
def _check_vision(bundle: "Bundle", what: str) -> None:
    if bundle.model.vision is None or bundle.image_transform is None or bundle.processor.cfg.num_image_tokens == 0:
        where = f" at {bundle.path}" if bundle.path else ""
        raise ValueError(f"{what} needs a model with a vision encoder; the model{where} has none")


def _understand(bundle: "Bundle", task: str, images: list, prompts: list[str], prompt_name: str,
                gen_length: int | None, block_length: Any, steps: int | None, sampler: SamplerConfig | None,
                generator) -> list[TextResult]:
    _check_vision(bundle, f"{task}")
    n, cfg = resolve_settings(task, bundle.processor, gen_length, block_length, steps, sampler)
    pixels = [bundle.image_transform(load_image(im)) for im in images]  # each (3, H, W)
    items = [
        layout_canvas(bundle.processor, bundle.model, task, p, prompt_name, pixel_values=px, gen_length=n)
        for p, px in zip(prompts, pixels)
    ]
    out, _, seconds = _run(bundle, items, cfg, generator, text=True)
    return _text_results(bundle, task, out, seconds)


def answer(
    bundle: "Bundle",
    image: ImageInput | Sequence[ImageInput],
    question: str | Sequence[str],
    gen_length: int | None = None,
    block_length: int | None | _Default = DEFAULT,
    steps: int | None = None,
    sampler: SamplerConfig | None = None,
    generator: torch.Generator | int | None = None,
) -> TextResult | list[TextResult]:
    """Visual question answering.  ``image`` / ``question``: one each, or lists of equal length
    (a single one is paired with every item of the other list)."""
    images, many_i = _as_list(image)
    questions, many_q = _as_list(question)
    questions = [check_text(q, "question") for q in questions]
    images, questions = _broadcast(images, questions, "image", "question")
    res = _understand(bundle, "vqa", images, questions, "question", gen_length, block_length, steps, sampler,
                      generator)
    return res if (many_i or many_q) else res[0]


def _instructed(task: str, doc: str):
    """An understanding entry point whose prompt is the task's fixed instruction (TASK_PROMPTS)."""

    def entry(
        bundle: "Bundle",
        image: ImageInput | Sequence[ImageInput],
        gen_length: int | None = None,
        block_length: int | None | _Default = DEFAULT,
        steps: int | None = None,
        sampler: SamplerConfig | None = None,
        generator: torch.Generator | int | None = None,
    ) -> TextResult | list[TextResult]:
        images, many = _as_list(image)
        res = _understand(bundle, task, images, [TASK_PROMPTS[task]] * len(images), "prompt", gen_length,
                          block_length, steps, sampler, generator)
        return res if many else res[0]

    entry.__name__ = entry.__qualname__ = task
    entry.__doc__ = doc
    return entry


caption = _instructed("caption", "A short caption of each image (the ``caption`` task prompt).")
describe = _instructed("describe", "A detailed description of each image (the ``describe`` task prompt).")


# --------------------------------------------------------------------------------------------
# Text to image
# --------------------------------------------------------------------------------------------
def codes_to_pil(vq: Any, codes: Tensor) -> list["PILImage.Image"]:
    """(N, h, w) codes -> N PIL RGB images through ``vq.decode_codes`` ([0, 1] images)."""
    from PIL import Image

    pixels = vq.decode_codes(codes)  # (N, 3, H, W) in [0, 1]
    arr = (pixels.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a, mode="RGB") for a in arr]


def text_to_image(
    bundle: "Bundle",
    prompt: str | Sequence[str],
    steps: int = T2I_STEPS,
    guidance: float | None = None,
    generator: torch.Generator | int | None = None,
    sampler: SamplerConfig | None = None,
) -> ImageResult | list[ImageResult]:
    """Generate an image (PIL) per prompt: VQ codes sampled by the engine, decoded by ``bundle.vq``.

    guidance: image CFG scale (None: ``DEFAULT_SETTINGS["t2i"]``'s 0.5; 0 switches it off);
    the unconditional branch is the empty-prompt layout.  ``sampler`` replaces the default
    settings (its ``steps`` is overridden by ``steps``).
    """
    proc = bundle.processor
    if bundle.vq is None or proc.cfg.codebook_size == 0:
        where = f" at {bundle.path}" if bundle.path else ""
        raise ValueError(f"text_to_image needs a model with a VQ image tokenizer; the model{where} has none")
    prompts, many = _as_list(prompt)
    prompts = [check_text(p, "prompt") for p in prompts]
    h, w = proc.cfg.code_grid
    _, cfg = resolve_settings("t2i", proc, h * w, None, steps, sampler)
    if guidance is not None:
        if not isinstance(guidance, (int, float)) or isinstance(guidance, bool):
            raise ValueError(f"guidance must be a number, got {type(guidance).__name__}")
        cfg.guidance.image_scale = float(guidance)
        cfg.validate()
    items = [layout_canvas(bundle.processor, bundle.model, "t2i", p, "prompt") for p in prompts]
    uncond = [proc.generation_inputs("t2i", "")] * len(items) if cfg.guidance.image_scale != 0 else None
    start = time.perf_counter()
    out, batch, _ = _run(bundle, items, cfg, generator, text=False, uncond_items=uncond)
    target = batch["target_mask"].to(out.tokens.device)  # (B, L)
    codes = proc.id_to_code(out.tokens[target]).view(len(items), h, w)  # (B, h, w)
    if bool((codes < 0).any()):  # cannot happen with the vocabulary restriction; guard anyway
        raise RuntimeError("the sampler produced non-code ids at image positions")
    images = codes_to_pil(bundle.vq, codes.to(next(bundle.vq.parameters()).device))
    seconds = time.perf_counter() - start
    results = [ImageResult(image=im, codes=c.cpu(), nfe=out.nfe, seconds=seconds) for im, c in zip(images, codes)]
    return results if many else results[0]
