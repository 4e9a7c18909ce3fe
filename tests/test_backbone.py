"""Backbone: config validation, forward, save/load, checkpointing, shifted logits, AR init, sizes."""

import pytest
import torch

from mmdiff.models import MDiffConfig, MDiffModel, get_size
from mmdiff.models.backbone import count_parameters
from mmdiff.models.sizes import SIZES, estimate_parameters


def debug_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return MDiffModel(MDiffConfig(**get_size("debug", **overrides))).eval()


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(hidden_size=30, num_attention_heads=4), "divisible by num_attention_heads"),
        (dict(num_attention_heads=4, num_key_value_heads=3), "divisible by\\s+num_key_value_heads"),
        (dict(mask_token_id=128), "outside the vocabulary"),
        (dict(attention_mode="sideways"), "attention_mode"),
        (dict(num_hidden_layers=0), "positive int"),
        (dict(hidden_size=24, num_attention_heads=8), "even"),
    ],
)
def test_config_rejects_impossible_shapes(overrides, message):
    with pytest.raises(ValueError, match=message):
        MDiffConfig(**get_size("debug", **overrides))


def test_config_defaults_and_head_dim():
    cfg = MDiffConfig(**get_size("debug"))
    assert cfg.resolved_head_dim == 8 and cfg.num_key_value_heads == 2
    assert cfg.mask_token_id is None  # ids come from the tokenizer, never a silent default
    assert MDiffConfig(hidden_size=32, num_attention_heads=4).num_key_value_heads == 4


# ---------------------------------------------------------------- forward


def test_forward_shapes_and_embeds_path():
    model = debug_model()
    ids = torch.randint(0, 128, (3, 9))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        again = model(inputs_embeds=model.get_input_embeddings()(ids))
    assert out.logits.shape == (3, 9, 128)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert out.last_hidden_state.shape == (3, 9, 32)
    assert out.past_key_values is None
    torch.testing.assert_close(out.logits, again.logits)
    with pytest.raises(ValueError, match="exactly one"):
        model()


def test_default_attention_mode_comes_from_config():
    model = debug_model(attention_mode="causal")
    ids = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, model(ids, attention_mode="causal").logits)
        assert not torch.allclose(model(ids).logits, model(ids, attention_mode="bidirectional").logits)


def test_shifted_logits():
    """Row i of a shifted model holds what the unshifted network outputs at position i - 1."""
    plain = debug_model(seed=1)
    shifted = debug_model(seed=1, shifted_logits=True)
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        a, b = plain(ids).logits, shifted(ids).logits
    torch.testing.assert_close(b[:, 1:], a[:, :-1])
    torch.testing.assert_close(b[:, 0], a[:, 0])


def test_training_step_and_gradient_checkpointing():
    model = debug_model(attention_dropout=0.0).train()
    ids = torch.randint(0, 128, (2, 10))
    real = torch.ones(2, 10, dtype=torch.bool)
    real[1, 7:] = False

    def grads():
        model.zero_grad()
        logits = model(ids, attention_mask=real, attention_mode="prefix",
                       prompt_mask=real & (torch.arange(10) < 4)).logits
        torch.nn.functional.cross_entropy(logits[real], ids[real]).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    assert all(torch.isfinite(g).all() for g in plain.values())
    model.activation_checkpointing_enable()
    assert model.gradient_checkpointing
    checkpointed = grads()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- save / load


@pytest.mark.parametrize("tie", [False, True])
def test_save_and_load_give_identical_logits(tmp_path, tie):
    from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

    model = debug_model(tie_word_embeddings=tie, mask_token_id=127, pad_token_id=0)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    ids = torch.randint(0, 128, (2, 6))
    real = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    with torch.no_grad():
        ref = model(ids, attention_mask=real).logits
        for loader in (MDiffModel, AutoModel, AutoModelForMaskedLM):
            loaded = loader.from_pretrained(tmp_path).eval()
            assert type(loaded) is MDiffModel
            assert torch.equal(loaded(ids, attention_mask=real).logits, ref)
    cfg = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(cfg, MDiffConfig) and cfg.mask_token_id == 127 and cfg.tie_word_embeddings == tie
    if tie:
        assert loaded.lm_head.weight is loaded.embed_tokens.weight


def test_resize_token_embeddings():
    """The unified model grows the vocabulary (text + VQ codebook) through the standard HF call."""
    for tie in (False, True):
        model = debug_model(tie_word_embeddings=tie)
        model.resize_token_embeddings(200, mean_resizing=False)
        assert model.config.vocab_size == 200
        assert model(torch.randint(0, 200, (1, 5))).logits.shape == (1, 5, 200)
        assert (model.lm_head.weight is model.embed_tokens.weight) == tie


def test_register_auto_classes_is_idempotent():
    from mmdiff.models import register_auto_classes

    register_auto_classes()
    register_auto_classes()


# ---------------------------------------------------------------- AR initialisation


def _tiny_causal_lm(kind):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  rms_norm_eps=1e-6, rope_theta=10000.0)
    torch.manual_seed(0)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=False)).eval()
    return Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=True)).eval()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_from_causal_lm_reproduces_the_causal_lm(tmp_path, kind):
    src = _tiny_causal_lm(kind)
    with torch.no_grad():  # make biases non-zero so they are really tested
        for p in src.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    src.save_pretrained(tmp_path, safe_serialization=True)
    assert list(tmp_path.glob("*.safetensors"))

    ids = torch.randint(0, 96, (2, 11))
    with torch.no_grad():
        ref = src(ids).logits
        from_dir = MDiffModel.from_causal_lm(tmp_path, mask_token_id=95).eval()
        from_obj = MDiffModel.from_causal_lm(src).eval()
        for model in (from_dir, from_obj):
            out = model(ids, attention_mode="causal").logits
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    cfg = from_dir.config
    assert cfg.mask_token_id == 95
    assert cfg.attention_bias == (kind == "qwen2") and not cfg.attention_out_bias
    assert cfg.tie_word_embeddings == (kind == "qwen2")
    assert count_parameters(from_dir) == count_parameters(src)


# ---------------------------------------------------------------- sizes


def test_sizes_registry():
    assert SIZES["quickstart"] == SIZES["mini"]
    with pytest.raises(ValueError, match="known sizes: .*debug"):
        get_size("huge")
    with pytest.raises(ValueError, match="unknown backbone config field"):
        get_size("debug", hidden=64)
    size = get_size("debug", hidden_size=64)
    assert size["hidden_size"] == 64 and SIZES["debug"]["hidden_size"] == 32
    llada = get_size("llada-8b")
    assert (llada["hidden_size"], llada["num_hidden_layers"], llada["num_attention_heads"],
            llada["intermediate_size"], llada["vocab_size"], llada["mask_token_id"]) == (
        4096, 32, 32, 12288, 126464, 126336)
    MDiffConfig(**llada)  # valid config (not built: 8B parameters)
    assert 7.5e9 < estimate_parameters(llada) < 8.5e9


@pytest.mark.parametrize("name, extra", [("debug", {}), ("debug", dict(tie_word_embeddings=True,
                                         attention_bias=True, attention_out_bias=True)), ("tiny", {})])
def test_parameter_estimate_matches_the_built_model(name, extra):
    size = get_size(name, **extra)
    assert count_parameters(MDiffModel(MDiffConfig(**size))) == estimate_parameters(size)
