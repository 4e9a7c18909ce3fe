"""The engine reproduces LLaDA's low-confidence semi-autoregressive sampler token for token.

``llada_reference`` below is written from LLaDA's published algorithm (the ``generate`` of the
paper's repository, described in ../shared/ANCHORS.md), not from the engine:

* canvas = prompt + L mask tokens; L / block_length blocks; steps / num_blocks steps per block;
* per block, ``get_num_transfer_tokens``: the block's mask count split evenly over its steps, the
  first ``n % steps`` steps one token more;
* per step: logits of the whole canvas (CFG: a second copy with every prompt token replaced by
  the mask token, ``logits = u + (cfg + 1)(c − u)``); x0 = argmax of LLaDA's float64 Gumbel
  trick ``exp(l) / (−log u)^T`` (plain argmax at T = 0); confidence = softmax(l)[x0];
  −∞ confidence beyond the block and at non-mask positions; commit each row's top-k.

Two alignments with the engine are deliberate and documented:
* mmdiff never produces the mask token, so the reference bans it too (``l[mask] = −∞`` after CFG;
  LLaDA's trained model never predicts it);
* the Gumbel uniforms are drawn, from the same ``torch.Generator``, only for the current block's
  columns (B, block_length, V) — the engine's draw; LLaDA draws them for the whole sequence from
  the global RNG, which only changes which random numbers are used, not the algorithm.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmdiff.models.backbone import MDiffConfig, MDiffModel
from mmdiff.models.sizes import get_size
from mmdiff.sampling import SamplerConfig, build_sampler
from mmdiff.sampling.engine import GuidanceConfig

VOCAB = 64
MASK = 3


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = MDiffConfig(**get_size("debug", vocab_size=VOCAB, initializer_range=0.3))
    return MDiffModel(cfg).eval()


def get_num_transfer_tokens(block_mask_index: torch.Tensor, steps: int) -> torch.Tensor:
    mask_num = block_mask_index.sum(dim=1, keepdim=True)  # (B, 1)
    base = mask_num // steps
    remainder = mask_num % steps
    num = torch.zeros(mask_num.size(0), steps, dtype=torch.long) + base
    for i in range(mask_num.size(0)):
        num[i, : remainder[i]] += 1
    return num  # (B, steps)


@torch.no_grad()
def llada_reference(model, prompt, steps, gen_length, block_length, temperature, cfg_scale, generator=None):
    B, Lp = prompt.shape
    x = torch.full((B, Lp + gen_length), MASK, dtype=torch.long)
    x[:, :Lp] = prompt
    attn = torch.ones_like(x, dtype=torch.bool)
    prompt_index = x != MASK
    num_blocks = gen_length // block_length
    steps_per_block = steps // num_blocks
    for nb in range(num_blocks):
        s, e = Lp + nb * block_length, Lp + (nb + 1) * block_length
        num_transfer = get_num_transfer_tokens(x[:, s:e] == MASK, steps_per_block)
        for i in range(steps_per_block):
            mask_index = x == MASK
            if cfg_scale > 0.0:
                un_x = x.clone()
                un_x[prompt_index] = MASK
                both = model(torch.cat([x, un_x]), attention_mask=torch.cat([attn, attn])).logits
                c, u = both.double().chunk(2)
                logits = u + (cfg_scale + 1) * (c - u)
            else:
                logits = model(x, attention_mask=attn).logits.double()
            logits[..., MASK] = float("-inf")
            x0 = logits.argmax(-1)  # (B, L)
            if temperature > 0:
                blk = logits[:, s:e]
                noise = torch.rand(blk.shape, generator=generator, dtype=torch.float64)
                gumbel = (-torch.log(noise)) ** temperature
                x0[:, s:e] = (blk.exp() / gumbel).argmax(-1)
            p = F.softmax(logits, dim=-1)
            x0_p = torch.gather(p, -1, x0[..., None]).squeeze(-1)  # (B, L)
            x0_p[:, e:] = float("-inf")
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, torch.full_like(x0_p, float("-inf")))
            transfer = torch.zeros_like(x0, dtype=torch.bool)
            for j in range(B):
                _, idx = torch.topk(confidence[j], k=int(num_transfer[j, i]))
                transfer[j, idx] = True
            x[transfer] = x0[transfer]
    return x


def engine_generate(model, prompt, steps, gen_length, block_length, temperature, cfg_scale, generator=None):
    B, Lp = prompt.shape
    ids = torch.cat([prompt, torch.full((B, gen_length), MASK, dtype=torch.long)], dim=1)
    target = torch.zeros_like(ids, dtype=torch.bool)
    target[:, Lp:] = True
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(target), target_mask=target)
    cfg = SamplerConfig(
        steps=steps, block_length=block_length, temperature=temperature,
        guidance=GuidanceConfig(text_scale=cfg_scale, text_uncond="mask_prompt"),
    )
    return build_sampler(cfg).generate(model, batch, generator, mask_token_id=MASK)


def _prompt(B=2, Lp=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, VOCAB, (B, Lp), generator=g)


@pytest.mark.parametrize("block_length,steps", [(4, 8), (8, 8), (16, 16), (16, 5)])
@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
def test_greedy_matches_llada(model, block_length, steps, cfg_scale):
    prompt = _prompt()
    ref = llada_reference(model, prompt, steps, 16, block_length, 0.0, cfg_scale)
    out = engine_generate(model, prompt, steps, 16, block_length, 0.0, cfg_scale)
    assert torch.equal(out.tokens, ref)
    assert out.nfe == steps
    assert out.rows_per_pass == (4 if cfg_scale else 2)


@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
def test_sampled_matches_llada_with_same_generator(model, cfg_scale):
    prompt = _prompt(seed=2)
    ref = llada_reference(model, prompt, 8, 16, 8, 0.8, cfg_scale, torch.Generator().manual_seed(7))
    out = engine_generate(model, prompt, 8, 16, 8, 0.8, cfg_scale, torch.Generator().manual_seed(7))
    assert torch.equal(out.tokens, ref)
    greedy = engine_generate(model, prompt, 8, 16, 8, 0.0, cfg_scale)
    assert not torch.equal(out.tokens, greedy.tokens)  # the noise really was used


def test_committed_per_step_is_llada_split(model):
    out = engine_generate(model, _prompt(B=1), 6, 16, 8, 0.0, 0.0)
    # 8 masks per block over 3 steps: 3, 3, 2 (LLaDA's even split, remainder first)
    assert [c[0] for c in out.committed_per_step] == [3, 3, 2, 3, 3, 2]
