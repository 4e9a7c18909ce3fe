"""The processor: (task, image, prompt, target) -> token ids, image slots, attention mode, target mask.

This is the ONE place where sequences are laid out, for training and for sampling alike, so
that the sampler always sees exactly the layout the model was trained on.

Vocabulary of the unified model::

    [0, V_text)                 text tokens, specials included (mask, pad, eos, ...)
    [V_text, V_text + K)        VQ image codes: code c  ->  id V_text + c

Layouts (a chat template with role markers; ``P`` = vision placeholders, ``G`` = h*w codes)::

    understanding  [bos] <user> <img_start> <image>*P <img_end> prompt <assistant> | answer <eos>*
                   with ``readout_codes``: <img_start> <image>*P | code*G | <img_end> (see below)
    text           [bos] <user> prompt <assistant> | text <eos>*
    t2i            [bos] <user> prompt <assistant> <img_start> | code*G | <img_end>
    inpaint        like t2i; given codes are part of the prompt, only the missing ones are targets

``|`` marks where the target begins.  Answers are padded with EOS up to the task's
``answer_length`` and the EOS padding is a target too (LLaDA SFT): the model learns to end.
Vision placeholders are filled with projected encoder features and are never masked.

``readout_codes`` (an auxiliary objective, in the spirit of reconstructive visual instruction
tuning, ROSS): every image an understanding row reads is followed by G slots for its own VQ codes.
In training they hold the codes and are targets that are always masked (the objective's
``image_codes.readout_weight``): the language model learns to write, at the slot of each grid
cell, what the vision tokens show there -- an explicit, position-bound reading of the image that
the answer can attend to.  In generation they hold the mask id and are not generated, as in
training -- unless the sampler's ``fill_readout`` writes them first for a model trained to read them
(the objective's ``image_codes.readout_given_prob``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

__all__ = ["ProcessorConfig", "MMProcessor", "Encoded", "TASKS", "TASK_PROMPTS"]

TASKS = ("caption", "vqa", "describe", "text", "t2i", "inpaint", "conversation")
UNDERSTANDING = {"caption", "vqa", "describe", "conversation"}
IMAGE_GEN = {"t2i", "inpaint"}

#: Default instruction for tasks whose prompt carries no user text.
TASK_PROMPTS = {
    "caption": "describe the image briefly.",
    "describe": "describe the image in detail.",
}


@dataclass
class ProcessorConfig:
    """How sequences are laid out; every length is explicit."""

    num_image_tokens: int = 16  # vision placeholders per input image (after the projector)
    code_grid: tuple[int, int] = (8, 8)  # VQ code grid (h, w) of one generated image
    codebook_size: int = 512
    max_length: int = 256
    answer_lengths: dict[str, int] = field(
        default_factory=lambda: {"caption": 40, "vqa": 4, "describe": 40, "text": 40, "conversation": 64}
    )
    use_bos: bool = True
    #: understanding rows carry G = h * w always-masked slots for the input image's VQ codes (above)
    readout_codes: bool = False

    def validate(self) -> None:
        if self.num_image_tokens < 0:  # 0: the model has no vision encoder
            raise ValueError(f"num_image_tokens must be >= 0, got {self.num_image_tokens}")
        if min(self.code_grid) < 1:
            raise ValueError(f"code_grid must be positive, got {self.code_grid}")
        if self.codebook_size < 0:  # 0: the model has no VQ tokenizer
            raise ValueError(f"codebook_size must be >= 0, got {self.codebook_size}")
        if self.readout_codes and (self.codebook_size == 0 or self.num_image_tokens == 0):
            raise ValueError("readout_codes needs a VQ tokenizer (codebook_size > 0) and a vision encoder "
                             f"(num_image_tokens > 0); got codebook_size={self.codebook_size}, "
                             f"num_image_tokens={self.num_image_tokens}")
        for task, n in self.answer_lengths.items():
            if task not in TASKS:
                raise ValueError(f"answer_lengths: unknown task {task!r} (tasks: {', '.join(TASKS)})")
            if n < 0:
                raise ValueError(f"answer_lengths.{task} must be >= 0, got {n}")


@dataclass
class Encoded:
    """One laid-out example (1-D tensors of length L)."""

    input_ids: torch.Tensor  # (L,) long, clean target included
    target_mask: torch.Tensor  # (L,) bool
    image_slots: torch.Tensor  # (L,) bool, vision placeholders
    image_code_mask: torch.Tensor  # (L,) bool, positions holding VQ codes
    task: str
    pixel_values: torch.Tensor | None = None  # (3, H, W) when the task reads an image
    key: str = ""


class MMProcessor:
    """Lays out examples for the unified model.  Special-token ids come from the tokenizer."""

    def __init__(self, tokenizer: Any, special: Any, cfg: ProcessorConfig):
        from mmdiff.text_tokenizer import special_ids

        cfg.validate()
        self.tokenizer = tokenizer
        self.special = special
        self.cfg = cfg
        self.ids: dict[str, int] = special_ids(tokenizer, special)
        self.text_vocab_size = len(tokenizer)
        self.vocab_size = self.text_vocab_size + cfg.codebook_size
        self.task_index = {t: i for i, t in enumerate(TASKS)}
        self._text_ids: dict[str, tuple[int, ...]] = {}  # encode_text memo (tokenising is pure)

    # ------------------------------------------------------------------ ids
    @property
    def mask_id(self) -> int:
        return self.ids["mask"]

    @property
    def eos_id(self) -> int:
        return self.ids["eos"]

    @property
    def pad_id(self) -> int:
        return self.ids["pad"]

    @property
    def num_readout_codes(self) -> int:
        """Read-out code slots after an understanding row's image (0 without ``readout_codes``)."""
        h, w = self.cfg.code_grid
        return h * w if self.cfg.readout_codes else 0

    def code_to_id(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.long() + self.text_vocab_size

    def id_to_code(self, ids: torch.Tensor) -> torch.Tensor:
        """Ids outside the code range map to -1 (the caller decides what to do)."""
        codes = ids.long() - self.text_vocab_size
        return torch.where((codes >= 0) & (codes < self.cfg.codebook_size), codes, torch.full_like(codes, -1))

    #: ``encode_text`` remembers this many distinct strings (a multi-epoch run re-tokenises the same
    #: captions and questions every epoch; one HF ``encode`` call costs ~0.3 ms)
    TEXT_MEMO = 65536

    def encode_text(self, text: str) -> list[int]:
        ids = self._text_ids.get(text)
        if ids is None:
            ids = tuple(self.tokenizer.encode(text, add_special_tokens=False))
            if len(self._text_ids) >= self.TEXT_MEMO:
                self._text_ids.pop(next(iter(self._text_ids)))  # oldest first
            self._text_ids[text] = ids
        return list(ids)

    def decode_text(self, ids: Sequence[int] | torch.Tensor, stop_at_eos: bool = True) -> str:
        out = []
        for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids):
            if stop_at_eos and i == self.eos_id:
                break
            if 0 <= i < self.text_vocab_size and i not in self.ids.values():
                out.append(i)
        return self.tokenizer.decode(out, skip_special_tokens=True).strip()

    # ------------------------------------------------------------------ layout
    def _prompt_ids(self, task: str, prompt: str, has_image: bool) -> tuple[list[int], int]:
        """Returns (ids, offset of the first vision placeholder or -1)."""
        ids = [self.ids["bos"]] if self.cfg.use_bos else []
        ids.append(self.ids["user"])
        offset = -1
        if has_image:
            ids.append(self.ids["image_start"])
            offset = len(ids)
            ids += [self.ids["image"]] * self.cfg.num_image_tokens
            if self.cfg.readout_codes:  # the read-out slots: masks here, codes written by _text_encoded
                ids += [self.mask_id] * self.num_readout_codes
            ids.append(self.ids["image_end"])
        if not prompt and task in TASK_PROMPTS:
            prompt = TASK_PROMPTS[task]
        ids += self.encode_text(prompt) if prompt else []
        ids.append(self.ids["assistant"])
        return ids, offset

    def _answer_ids(self, task: str, target: str | None, length: int | None) -> list[int]:
        """Target text + EOS, padded with EOS to ``length`` (answer_lengths[task] by default)."""
        n = self.cfg.answer_lengths.get(task, 0) if length is None else length
        ids = (self.encode_text(target) if target else []) + [self.eos_id]
        if n:
            if len(ids) > n:
                raise ValueError(
                    f"{task} answer has {len(ids)} tokens (EOS included) > answer_lengths.{task}={n}: {target!r}"
                )
            ids += [self.eos_id] * (n - len(ids))
        return ids

    def encode(
        self,
        task: str,
        prompt: str = "",
        target: str | None = None,
        pixel_values: torch.Tensor | None = None,
        codes: torch.Tensor | None = None,
        given_codes: torch.Tensor | None = None,
        key: str = "",
    ) -> Encoded:
        """Lay out one training example.

        ``pixel_values`` (3, H, W): the input image of an understanding task, already transformed
        for the vision encoder.  ``codes`` (h, w) long: the target image of t2i/inpaint.
        ``given_codes`` (h, w) bool: for inpainting, which codes are given (kept in the prompt).
        With ``readout_codes``, ``codes`` of an understanding task are the input image's codes, the
        read-out targets (None: the slots stay masked and are not targets).
        """
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r} (tasks: {', '.join(TASKS)})")
        self._check_capable(task)
        if task in UNDERSTANDING and pixel_values is None:
            raise ValueError(f"task {task!r} needs an image (pixel_values is None) [key={key}]")
        if task in IMAGE_GEN:
            if codes is None:
                raise ValueError(f"task {task!r} needs target image codes [key={key}]")
            return self._encode_image_gen(task, prompt, codes, given_codes, key)
        pids, offset = self._prompt_ids(task, prompt, has_image=task in UNDERSTANDING)
        return self._text_encoded(task, pids, offset, self._answer_ids(task, target, None), pixel_values, key,
                                  readout=codes if task in UNDERSTANDING else None)

    def _text_encoded(self, task: str, pids: list[int], offset: int, aids: list[int],
                      pixel_values: torch.Tensor | None, key: str, readout: torch.Tensor | None = None) -> Encoded:
        """prompt ids + answer ids -> ``Encoded`` (answer = target; vision slots from ``offset``;
        ``readout`` (h, w): the image's codes written into its read-out slots, which become targets)."""
        ids = pids + aids
        self._check_length(ids, key)
        L = len(ids)
        target_mask = torch.zeros(L, dtype=torch.bool)
        target_mask[len(pids):] = True
        slots = torch.zeros(L, dtype=torch.bool)
        code_mask = torch.zeros(L, dtype=torch.bool)
        input_ids = torch.tensor(ids, dtype=torch.long)
        if offset >= 0:
            slots[offset: offset + self.cfg.num_image_tokens] = True
            g = self.num_readout_codes
            if g:
                at = slice(offset + self.cfg.num_image_tokens, offset + self.cfg.num_image_tokens + g)
                code_mask[at] = True
                if readout is not None:
                    if tuple(readout.shape) != tuple(self.cfg.code_grid):
                        raise ValueError(f"read-out codes of shape {tuple(readout.shape)} != code_grid "
                                         f"{tuple(self.cfg.code_grid)} [key={key}]")
                    input_ids[at] = self.code_to_id(readout.reshape(-1))
                    target_mask[at] = True
        if readout is not None and not bool(code_mask.any()):
            raise ValueError(f"read-out codes given, but this row has no read-out slots (an image and "
                             f"readout_codes: true are needed) [key={key}]")
        return Encoded(
            input_ids=input_ids,
            target_mask=target_mask,
            image_slots=slots,
            image_code_mask=code_mask,
            task=task,
            pixel_values=pixel_values if task in UNDERSTANDING else None,
            key=key,
        )

    def _encode_image_gen(self, task, prompt, codes, given_codes, key) -> Encoded:
        h, w = self.cfg.code_grid
        if tuple(codes.shape) != (h, w):
            raise ValueError(f"image codes of shape {tuple(codes.shape)} != code_grid {(h, w)} [key={key}]")
        pids, _ = self._prompt_ids(task, prompt, has_image=False)
        pids.append(self.ids["image_start"])
        code_ids = self.code_to_id(codes.reshape(-1)).tolist()
        ids = pids + code_ids + [self.ids["image_end"]]
        self._check_length(ids, key)
        L = len(ids)
        code_mask = torch.zeros(L, dtype=torch.bool)
        code_mask[len(pids): len(pids) + h * w] = True
        target_mask = code_mask.clone()
        if task == "inpaint" and given_codes is not None:
            target_mask[len(pids): len(pids) + h * w] = ~given_codes.reshape(-1).bool()
        return Encoded(
            input_ids=torch.tensor(ids, dtype=torch.long),
            target_mask=target_mask,
            image_slots=torch.zeros(L, dtype=torch.bool),
            image_code_mask=code_mask,
            task=task,
            key=key,
        )

    def _check_capable(self, task: str) -> None:
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r} (tasks: {', '.join(TASKS)})")
        if task in UNDERSTANDING and self.cfg.num_image_tokens == 0:
            raise ValueError(f"task {task!r} needs a vision encoder, but this model has none (num_image_tokens=0)")
        if task in IMAGE_GEN and self.cfg.codebook_size == 0:
            raise ValueError(f"task {task!r} needs a VQ tokenizer, but this model has none (codebook_size=0)")

    def _check_length(self, ids: list[int], key: str) -> None:
        if len(ids) > self.cfg.max_length:
            raise ValueError(f"sequence of {len(ids)} tokens > max_length={self.cfg.max_length} [key={key}]")

    # ------------------------------------------------------------------ generation
    def generation_inputs(
        self,
        task: str,
        prompt: str = "",
        pixel_values: torch.Tensor | None = None,
        gen_length: int | None = None,
        given_codes: torch.Tensor | None = None,
    ) -> Encoded:
        """The canvas for sampling: the prompt followed by ``gen_length`` mask tokens.

        For t2i the canvas is ``<img_start> mask*G <img_end>``; inpainting keeps the given codes
        (``given_codes`` (h, w) long with -1 where a code is to be generated).
        """
        self._check_capable(task)
        m = self.mask_id
        if task in IMAGE_GEN:
            h, w = self.cfg.code_grid
            codes = torch.full((h, w), 0, dtype=torch.long)
            enc = self._encode_image_gen("t2i", prompt, codes, None, "")
            ids = enc.input_ids.clone()
            pos = enc.image_code_mask.nonzero().squeeze(-1)
            target = enc.image_code_mask.clone()
            if given_codes is not None:
                flat = given_codes.reshape(-1)
                keep = flat >= 0
                ids[pos[keep]] = self.code_to_id(flat[keep])
                target[pos[keep]] = False
            ids[target] = m
            enc.input_ids, enc.target_mask, enc.task = ids, target, task
            return enc
        if task in UNDERSTANDING and pixel_values is None:
            raise ValueError(f"task {task!r} needs an image")
        pids, offset = self._prompt_ids(task, prompt, has_image=task in UNDERSTANDING)
        n = gen_length if gen_length is not None else self.cfg.answer_lengths.get(task, 0)
        if n < 1:
            raise ValueError(f"gen_length must be >= 1 for task {task!r}, got {n}")
        return self._text_encoded(task, pids, offset, [m] * n, pixel_values, "")

    # ------------------------------------------------------------------ batching
    def collate(self, items: Sequence[Encoded], pad_to: int | None = None, left_pad: bool = False) -> dict:
        """Pad a list of ``Encoded`` into the batch contract of docs/design.md.

        Right padding for training; ``left_pad=True`` for generation so that every canvas ends
        at the same column.
        """
        if not items:
            raise ValueError("collate() got an empty list")
        L = max(len(e.input_ids) for e in items)
        if pad_to is not None:
            if pad_to < L:
                raise ValueError(f"pad_to={pad_to} < longest example {L}")
            L = pad_to
        B = len(items)
        out = {
            "input_ids": torch.full((B, L), self.pad_id, dtype=torch.long),
            "attention_mask": torch.zeros(B, L, dtype=torch.bool),
            "target_mask": torch.zeros(B, L, dtype=torch.bool),
            "image_slots": torch.zeros(B, L, dtype=torch.bool),
            "image_code_mask": torch.zeros(B, L, dtype=torch.bool),
        }
        for b, e in enumerate(items):
            n = len(e.input_ids)
            sl = slice(L - n, L) if left_pad else slice(0, n)
            out["input_ids"][b, sl] = e.input_ids
            out["attention_mask"][b, sl] = True
            out["target_mask"][b, sl] = e.target_mask
            out["image_slots"][b, sl] = e.image_slots
            out["image_code_mask"][b, sl] = e.image_code_mask
        out["prompt_mask"] = out["attention_mask"] & ~out["target_mask"]
        pix = [e.pixel_values for e in items if e.pixel_values is not None]
        out["pixel_values"] = torch.stack(pix) if pix else None
        out["task_ids"] = torch.tensor([self.task_index[e.task] for e in items], dtype=torch.long)
        out["keys"] = [e.key for e in items]
        return out
