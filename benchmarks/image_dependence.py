"""Does a trained model read the image?  Answer NLL with the right, a shuffled and a blank image.

    python benchmarks/image_dependence.py --model runs/x/model --data DATA/shapes/test [--samples 256] [--json]
        [--max-caption-words 8]   # one-object scenes only

For each of ``--samples`` test scenes one VQA pair (its first question) is encoded as in
training with EVERY answer token masked; the mean NLL of the answer's own tokens (not its EOS
padding) is computed three times:
with the scene's own image, with the images rolled by one row (every row sees another scene),
and with a blank (all-black) image.  A model that uses the image has ``right`` clearly below
``shuffled``; ``gap = shuffled - right`` is the number to watch while changing a recipe (it is
cheap: no sampling).

The same three NLLs are reported for the colour words of each scene's canonical caption
(``caption_colour_*``), encoded as a ``caption`` row with ONLY those words masked: everything
else of the caption (sizes, shapes, cells) is given, so the colours are the one thing left to
read from the image -- the direct test of whether the language model reads the tower's content
(log 6 = 1.79 when it does not).  The same for the shape words (``caption_shape_*``; log 3 = 1.10)
and the size words (``caption_size_*``; log 2 = 0.69), each with only those words masked.

Also reported, for the projector's outputs on these images: their mean norm next to the text
embeddings' (a large gap slows learning in a pre-norm transformer) and the share of their
variance that is between images (``between_image_variance``; near 0 = the projector collapsed
onto one vector and the images look alike to the language model).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def measure(model_dir: str | Path, data: str | Path, samples: int = 256, batch_size: int = 64,
            max_caption_words: int = 0) -> dict:
    from mmdiff.data.shards import read_samples
    from mmdiff.data.tasks import caption_words
    from mmdiff.models.bundle import load_bundle
    from mmdiff.world import COLORS, SHAPES, SIZES

    b = load_bundle(model_dir)
    m, proc = b.model.eval(), b.processor
    if m.vision is None or b.image_transform is None:
        raise ValueError(f"{model_dir}: the model has no vision tower; nothing to measure")
    items, images, caps, cap_images = [], [], [], []
    for s in read_samples(data):  # one pass: each scene's first question and its canonical caption
        if s.image is None or (max_caption_words and caption_words(s) > max_caption_words):
            continue
        pix = b.image_transform(s.image.convert("RGB"))
        qa = getattr(s, "qa", None) or (s.meta or {}).get("qa") or []
        if qa and len(items) < samples:
            items.append(proc.encode("vqa", prompt=qa[0]["question"], target=qa[0]["answer"], pixel_values=pix))
            images.append(pix)
        text = s.captions[0] if s.captions else s.caption
        if text and len(caps) < samples:
            caps.append(proc.encode("caption", prompt="", target=text, pixel_values=pix))
            cap_images.append(pix)
        if len(items) >= samples and len(caps) >= samples:
            break
    if len(items) < 2:
        raise ValueError(f"{data}: fewer than 2 scenes with an image and a question")
    out = _nll_three_ways(m, proc, items, images, batch_size, _answer_tokens(proc))
    feats = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            feats.append(m.encode_images(torch.stack(images[i:i + batch_size])))
    f = torch.cat(feats)  # (N, P, D)
    centred = f - f.mean(0, keepdim=True)
    emb = m.get_input_embeddings().weight
    out.update(
        gap=out["shuffled"] - out["right"],
        samples=len(items),
        feature_norm=float(f.norm(dim=-1).mean()),
        text_embedding_norm=float(emb.norm(dim=-1).mean()),
        between_image_variance=float(centred.pow(2).sum() / f.pow(2).sum()),
    )
    for name, words in (("colour", COLORS), ("shape", SHAPES), ("size", SIZES)):
        ids = torch.tensor(sorted({t[0] for w in words for v in (w, " " + w)
                                   if len(t := b.tokenizer.encode(v, add_special_tokens=False)) == 1}))
        cap = _nll_three_ways(m, proc, caps, cap_images, batch_size, _word_tokens(ids))
        out.update({f"caption_{name}_{k}": v for k, v in cap.items()})
        out[f"caption_{name}_gap"] = cap["shuffled"] - cap["right"]
    return out


def _answer_tokens(proc):
    """All of the answer is masked; scored: its own tokens (its EOS padding is the same for every image)."""
    filler = torch.tensor([proc.ids["eos"], proc.ids["pad"]])

    def select(batch, target):
        return target, target & ~torch.isin(batch["input_ids"], filler)
    return select


def _word_tokens(vocab):
    """Only the target's words of one attribute (its colours, shapes or sizes) are masked, and scored."""
    def select(batch, target):
        words = target & torch.isin(batch["input_ids"], vocab)
        return words, words
    return select


def _nll_three_ways(m, proc, items, images, batch_size, select) -> dict:
    sums = {"right": 0.0, "shuffled": 0.0, "blank": 0.0}
    count = 0
    with torch.no_grad():
        for i in range(0, len(items), batch_size):
            batch = proc.collate(items[i:i + batch_size])
            pix = torch.stack(images[i:i + batch_size])
            masked, scored = select(batch, batch["target_mask"] & batch["attention_mask"])
            ids = batch["input_ids"].masked_fill(masked, proc.mask_id)
            for name, pv in (("right", pix), ("shuffled", pix.roll(1, 0)), ("blank", torch.full_like(pix, pix.min()))):
                logits = m(input_ids=ids, attention_mask=batch["attention_mask"], image_slots=batch["image_slots"],
                           pixel_values=pv).logits.float()
                nll = -torch.log_softmax(logits, -1).gather(-1, batch["input_ids"][..., None])[..., 0]
                sums[name] += float(nll[scored].sum())
            count += int(scored.sum())
    if not count:
        raise ValueError("no scored tokens")
    return {k: v / count for k, v in sums.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="shard directory with images and qa (e.g. DATA/shapes/test)")
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--max-caption-words", type=int, default=0,
                   help="only scenes whose canonical caption has at most this many words (8: one-object Shapes scenes)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    r = measure(a.model, a.data, a.samples, max_caption_words=a.max_caption_words)
    print(f"answer NLL  right {r['right']:.4f}  shuffled {r['shuffled']:.4f}  blank {r['blank']:.4f}  "
          f"gap {r['gap']:+.4f}  ({r['samples']} scenes)")
    for name in ("colour", "shape", "size"):
        print(f"caption {name} words NLL  right {r[f'caption_{name}_right']:.4f}  shuffled "
              f"{r[f'caption_{name}_shuffled']:.4f}  blank {r[f'caption_{name}_blank']:.4f}  gap {r[f'caption_{name}_gap']:+.4f}")
    print(f"projected features: norm {r['feature_norm']:.2f} (text embeddings {r['text_embedding_norm']:.2f}), "
          f"between-image variance share {r['between_image_variance']:.3f}")
    if a.json:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
