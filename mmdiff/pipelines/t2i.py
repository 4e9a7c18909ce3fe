"""``MMDiffT2IPipeline``: text-to-image as a diffusers ``DiffusionPipeline``.

    pipe = MMDiffT2IPipeline.from_bundle(load_bundle("runs/shapes/model"))
    images = pipe("a red circle in the top left", num_inference_steps=16, guidance_scale=0.5,
                  generator=torch.Generator().manual_seed(0)).images          # [PIL.Image]
    pipe.save_pretrained("t2i_pipe");  MMDiffT2IPipeline.from_pretrained("t2i_pipe")

Components (``model_index.json``)::

    model      ["mmdiff.models.unified", "MMDiffForDiffusion"]      transformers PreTrainedModel
    vq         ["diffusers", "VQModel"]                              the raw diffusers VQ model
    tokenizer  ["transformers", "TokenizersBackend"]                 the text tokenizer
    scheduler  ["mmdiff.sampling.scheduler", "MaskedDiffusionScheduler"]
    vq_l2_normalize  bool   (the VQ adapter's options that are not in the VQModel config:
    vq_tile_size     int     cosine lookup, tiles coded alone, space-to-depth patches,
    vq_patch_size    int     the cell layout and the image side it is cut from)
    vq_cell_grid     int
    vq_image_size    int
    vq_output_levels int     (decoded channels rounded to this many levels; 0 = off)

diffusers saves and loads a component whose class subclasses one of its known bases
(``ModelMixin``, ``SchedulerMixin``, transformers ``PreTrainedModel`` / tokenizers), importing
the class from the module path recorded in ``model_index.json``; so every component here is such
a class and ``from_pretrained`` of a local folder works offline (``HF_HUB_OFFLINE=1``).  The VQ
adapter (:class:`mmdiff.models.vq.VQTokenizer`) is a plain ``nn.Module``, hence the raw
``VQModel`` is the component and the adapter is rebuilt around it (same weights).  The processor
(sequence layout) is rebuilt from ``model.config`` (``processor``, ``special_tokens``) and the
tokenizer, exactly as ``load_bundle`` does.

The loop is the diffusers one, with :class:`MaskedDiffusionScheduler` -- the same masking
schedule object training's ``add_noise`` uses::

    scheduler.set_timesteps(S)
    for i in scheduler.timesteps:
        logits = (1 + g) * model(x) - g * model(x_uncond)     # one forward of 2B rows (g = 0: B rows)
        x = scheduler.step(logits, i, x, generator, maskable=canvas, code_positions=canvas).prev_sample

with the unconditional rows laid out as the empty prompt (Muse), built by the engine's
:class:`~mmdiff.sampling.guidance.EmptyPromptUncond`.  It draws different random numbers than
:func:`mmdiff.generation.text_to_image` (the engine), so the two give different images for one
seed; both are deterministic.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, VQModel

from mmdiff.generation import T2I_GUIDANCE, T2I_STEPS, T2I_THRESHOLD, check_text, codes_to_pil, layout_canvas
from mmdiff.models.unified import MMDiffForDiffusion, code_index
from mmdiff.models.vq import VQTokenizer, config_from_diffusers
from mmdiff.processor import MMProcessor, ProcessorConfig
from mmdiff.sampling.guidance import EmptyPromptUncond, GuidancePlan
from mmdiff.sampling.scheduler import MaskedDiffusionScheduler

__all__ = ["MMDiffT2IPipeline"]

DEFAULT_STEPS = T2I_STEPS
DEFAULT_GUIDANCE = T2I_GUIDANCE


def processor_from_model(model: MMDiffForDiffusion, tokenizer: Any) -> MMProcessor:
    """The processor a model directory describes (``config.processor`` / ``special_tokens``)."""
    from mmdiff.config import from_dict
    from mmdiff.text_tokenizer import SpecialTokens

    cfg = model.config
    special = from_dict(SpecialTokens, cfg.special_tokens) if cfg.special_tokens else SpecialTokens()
    proc_cfg = from_dict(ProcessorConfig, {
        k: (tuple(v) if k == "code_grid" else v) for k, v in (cfg.processor or {}).items()
    })
    return MMProcessor(tokenizer, special, proc_cfg)


class MMDiffT2IPipeline(DiffusionPipeline):
    """Text-to-image with an mmdiff unified model.

    Args:
        model: ``MMDiffForDiffusion`` whose vocabulary includes the VQ codebook.
        vq: the VQ image tokenizer: an ``mmdiff`` ``VQTokenizer`` (its ``VQModel`` becomes the
            component) or a diffusers ``VQModel``.
        tokenizer: the model's text tokenizer.
        scheduler: ``MaskedDiffusionScheduler`` with the processor's mask id and text vocabulary
            size (``from_bundle`` builds one).
        vq_l2_normalize: cosine codebook lookup (the adapter option); None: taken from a
            ``VQTokenizer``, False for a bare ``VQModel`` (diffusers' own quantisation).
    """

    model_cpu_offload_seq = "model->vq"

    def __init__(
        self,
        model: MMDiffForDiffusion,
        vq: VQTokenizer | VQModel,
        tokenizer: Any,
        scheduler: MaskedDiffusionScheduler,
        vq_l2_normalize: bool | None = None,
        vq_tile_size: int | None = None,
        vq_patch_size: int | None = None,
        vq_cell_grid: int | None = None,
        vq_image_size: int | None = None,
        vq_output_levels: int | None = None,
    ):
        super().__init__()
        if isinstance(vq, VQTokenizer):
            l2 = vq.config.l2_normalize if vq_l2_normalize is None else bool(vq_l2_normalize)
            tile = vq.config.tile_size if vq_tile_size is None else int(vq_tile_size)
            patch = vq.config.patch_size if vq_patch_size is None else int(vq_patch_size)
            cells = vq.config.cell_grid if vq_cell_grid is None else int(vq_cell_grid)
            size = vq.config.image_size if vq_image_size is None else int(vq_image_size)
            levels = vq.config.output_levels if vq_output_levels is None else int(vq_output_levels)
            vq = vq.model
        elif isinstance(vq, VQModel):
            l2 = bool(vq_l2_normalize) if vq_l2_normalize is not None else False
            tile, patch = int(vq_tile_size or 0), int(vq_patch_size or 1)
            cells, size = int(vq_cell_grid or 0), int(vq_image_size or 0)
            levels = int(vq_output_levels or 0)
        else:
            raise ValueError(f"vq must be a VQTokenizer or a diffusers VQModel, got {type(vq).__name__}")
        if not isinstance(scheduler, MaskedDiffusionScheduler):
            raise ValueError(f"scheduler must be a MaskedDiffusionScheduler, got {type(scheduler).__name__}")
        self.register_modules(model=model, vq=vq, tokenizer=tokenizer, scheduler=scheduler)
        self.register_to_config(vq_l2_normalize=l2, vq_tile_size=tile, vq_patch_size=patch, vq_cell_grid=cells,
                                vq_image_size=size if cells else 0, vq_output_levels=levels)
        self.processor = processor_from_model(model, tokenizer)
        proc = self.processor
        grid = proc.cfg.code_grid[0] if proc.cfg.code_grid else None
        self.vq_tokenizer = VQTokenizer(  # shares vq's weights
            config_from_diffusers(vq.config, l2, tile, patch, grid, cell_grid=cells, image_size=size if cells else 0,
                                  output_levels=levels),
            model=vq)
        if proc.cfg.codebook_size == 0:
            raise ValueError("model: this model has no VQ codebook (processor codebook_size=0); "
                             "it cannot generate images")
        if proc.cfg.codebook_size != self.vq_tokenizer.codebook_size:
            raise ValueError(f"vq: codebook of {self.vq_tokenizer.codebook_size} codes, but the model was trained "
                             f"with {proc.cfg.codebook_size}")
        sc = scheduler.config
        if sc.mask_token_id != proc.mask_id or sc.text_vocab_size != proc.text_vocab_size:
            raise ValueError(
                f"scheduler: mask_token_id={sc.mask_token_id}, text_vocab_size={sc.text_vocab_size}, but the "
                f"tokenizer gives mask id {proc.mask_id} and {proc.text_vocab_size} text tokens "
                "(build it with MMDiffT2IPipeline.from_bundle or default_scheduler)"
            )

    # ------------------------------------------------------------------ construction
    @staticmethod
    def default_scheduler(processor: MMProcessor, **overrides: Any) -> MaskedDiffusionScheduler:
        """The engine's text-to-image defaults: tokens at temperature 1, committed by confidence with
        threshold decoding (τ 0.7) over a cosine floor.  MaskGIT's own settings:
        ``threshold=None, score="gumbel_confidence", score_temperature=4.5``."""
        kwargs = dict(mask_token_id=processor.mask_id, text_vocab_size=processor.text_vocab_size, schedule="cosine",
                      score="confidence", temperature=1.0, threshold=T2I_THRESHOLD)
        kwargs.update(overrides)
        return MaskedDiffusionScheduler(**kwargs)

    @classmethod
    def from_bundle(cls, bundle: Any, **scheduler_overrides: Any) -> "MMDiffT2IPipeline":
        """A pipeline over a loaded model directory (``mmdiff.models.bundle.load_bundle``)."""
        if bundle.vq is None:
            where = f" at {bundle.path}" if getattr(bundle, "path", None) else ""
            raise ValueError(f"bundle: the model{where} has no VQ image tokenizer; it cannot generate images")
        scheduler = cls.default_scheduler(bundle.processor, **scheduler_overrides)
        return cls(model=bundle.model, vq=bundle.vq, tokenizer=bundle.tokenizer, scheduler=scheduler)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        num_inference_steps: int = DEFAULT_STEPS,
        guidance_scale: float = DEFAULT_GUIDANCE,
        generator: torch.Generator | None = None,
        output_type: Literal["pil", "pt", "np"] = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Generate one image per prompt.

        output_type: ``pil`` (list of PIL images), ``pt`` ((B, 3, H, W) float in [0, 1]) or ``np``
        ((B, H, W, 3) float in [0, 1]).
        """
        prompts = list(prompt) if isinstance(prompt, (list, tuple)) else [prompt]
        if not prompts:
            raise ValueError("prompt: got an empty list")
        prompts = [check_text(p, "prompt") for p in prompts]
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
        if output_type not in ("pil", "pt", "np"):
            raise ValueError(f"output_type must be 'pil', 'pt' or 'np', got {output_type!r}")
        proc, dev = self.processor, self.model.device
        items = [layout_canvas(proc, self.model, "t2i", p, "prompt") for p in prompts]
        batch = {k: v.to(dev) for k, v in proc.collate(items, left_pad=True).items() if torch.is_tensor(v)}
        B, L = batch["input_ids"].shape
        canvas = batch["target_mask"]  # (B, L) the masked code positions
        code_positions = batch["image_code_mask"]  # (B, L)

        plan = None
        am, pm = batch["attention_mask"], batch["prompt_mask"]
        code_slots = None  # each code's grid slot, for models with a learned embedding per slot
        if getattr(self.model, "code_position", None) is not None:
            code_slots = code_index(code_positions)  # (B, L)
        if float(guidance_scale) != 0.0:
            empty = proc.collate([proc.generation_inputs("t2i", "")] * B, left_pad=True, pad_to=L)
            empty = {k: v.to(dev) for k, v in empty.items() if torch.is_tensor(v)}
            rows = EmptyPromptUncond().build(batch, proc.mask_id, uncond_batch=empty)
            plan = GuidancePlan(scales=torch.full((B,), float(guidance_scale), dtype=torch.float64), uncond=rows)
            am, pm = torch.cat([am, rows.attention_mask]), torch.cat([pm, rows.prompt_mask])
            if code_slots is not None:  # the unconditional rows keep the code layout
                code_slots = torch.cat([code_slots, code_slots])

        x = batch["input_ids"].clone()  # (B, L)
        self.scheduler.set_timesteps(num_inference_steps, device=dev)
        for i in self.progress_bar(self.scheduler.timesteps):
            ids = x if plan is None else torch.cat([x, plan.uncond.ids(x)])  # (R, L)
            logits = self.model(ids, attention_mask=am, prompt_mask=pm, image_code_index=code_slots).logits  # (R, L, V)
            logits = plan.combine(logits) if plan is not None else logits.double()  # (B, L, V)
            x = self.scheduler.step(logits, i, x, generator=generator, maskable=canvas,
                                    code_positions=code_positions).prev_sample
            if not bool((x[canvas] == proc.mask_id).any()):  # threshold decoding can finish early
                break

        h, w = proc.cfg.code_grid
        codes = proc.id_to_code(x[canvas]).view(B, h, w)  # (B, h, w)
        if output_type == "pil":
            images: Any = codes_to_pil(self.vq_tokenizer, codes)
        else:
            images = self.vq_tokenizer.decode_codes(codes)  # (B, 3, H, W) in [0, 1]
            if output_type == "np":
                images = images.permute(0, 2, 3, 1).float().cpu().numpy()
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
