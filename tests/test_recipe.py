"""Recipes: validated before work, train the unified model end to end, resume, export a model dir."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mmdiff.cli import main
from mmdiff.config import ConfigError
from mmdiff.training.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
DEBUG = REPO / "train/configs/shapes-debug.yaml"


def _overrides(world, out, *extra):
    return [f"model.tokenizer={world['tokenizer']}", f"data.shards=[{world['train']}]", f"output_dir={out}",
            "data.shuffle_buffer=50", "train.progress=false", *extra]


def test_bad_recipes_refused_before_work(tiny_world, tmp_path):
    with pytest.raises(ConfigError, match="train.lrr"):
        load_recipe(DEBUG, _overrides(tiny_world, tmp_path, "train.lrr=1"))
    with pytest.raises(ConfigError, match="model.vq is not set"):
        load_recipe(DEBUG, _overrides(tiny_world, tmp_path, "data.task_weights={t2i: 1.0}"))
    with pytest.raises(ConfigError, match="unknown task 'poem'"):
        load_recipe(DEBUG, _overrides(tiny_world, tmp_path, "data.task_weights={poem: 1.0}"))
    with pytest.raises(FileNotFoundError, match="nope"):
        load_recipe(DEBUG, _overrides(tiny_world, tmp_path, "model.tokenizer=/nope"))
    with pytest.raises(ConfigError, match="task_batch_sizes needs group_by_task"):
        load_recipe(DEBUG, _overrides(tiny_world, tmp_path, "data.task_batch_sizes={vqa: 16}"))
    with pytest.raises(ConfigError, match="task_batch_sizes.vqa must be an integer"):
        load_recipe(DEBUG, _overrides(tiny_world, tmp_path, "data.group_by_task=true", "data.task_batch_sizes={vqa: 0}"))
    with pytest.raises(ConfigError, match=r"objective.task_weights: unknown task\(s\) \['poem'\]"):
        load_recipe(DEBUG, _overrides(tiny_world, tmp_path, "objective.task_weights={poem: 2.0}"))
    with pytest.raises(ConfigError, match=r"objective.task_min_mask_ratio: unknown task\(s\) \['qa'\]"):
        load_recipe(DEBUG, _overrides(tiny_world, tmp_path, "objective.task_min_mask_ratio={qa: 1.0}"))
    with pytest.raises(ConfigError, match="max_caption_words must be an integer >= 0"):
        load_recipe(DEBUG, _overrides(tiny_world, tmp_path, "data.max_caption_words=-3"))
    with pytest.raises(FileNotFoundError, match="path does not exist: /nope-source"):
        load_recipe(DEBUG, _overrides(tiny_world, tmp_path, "data.sources=[{shards: [/nope-source], weight: 0.5}]"))
    with pytest.raises(ConfigError, match=r"data.sources\[0\].weight must be a positive number"):
        load_recipe(DEBUG, _overrides(tiny_world, tmp_path, f"data.sources=[{{shards: [{tiny_world['train']}], weight: 0}}]"))
    assert not any(tmp_path.iterdir())  # nothing was written
    # task loss weights by task name need no task_names list: the recipe fills in every task
    r = load_recipe(DEBUG, _overrides(tiny_world, tmp_path, "objective.task_weights={vqa: 2.0}"))
    assert r.objective.task_weights == {"vqa": 2.0} and r.objective.task_names == []


def test_train_resume_and_export(tiny_world, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--config", str(DEBUG), *_overrides(tiny_world, out, "train.max_steps=6",
                                                           "train.save_every=3", "train.batch_size=4"), "--json"]
    assert main(argv) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["step"] == 6 and res["output_dir"] == str(out)
    assert res["resumed_from"] is None and res["loss"] == res["loss"]  # finite
    # the same command with more steps resumes from the latest checkpoint
    argv2 = [a if not a.startswith("train.max_steps") else "train.max_steps=8" for a in argv]
    assert main(argv2) == 0
    res2 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res2["step"] == 8 and res2["steps_run"] == 2 and res2["resumed_from"].endswith("step-00000006")
    from mmdiff.models.bundle import load_bundle

    b = load_bundle(res2["model_dir"])
    assert b.model.num_image_tokens == b.processor.cfg.num_image_tokens > 0
    assert b.processor.vocab_size == b.model.backbone.config.vocab_size


def test_data_sources_reach_the_training_stream(tiny_world, tmp_path):
    from mmdiff.training.recipe import PipelineSource, build_components

    recipe = load_recipe(DEBUG, _overrides(
        tiny_world, tmp_path, "data.task_weights={caption: 0.0, vqa: 1.0, describe: 0.0, text: 0.0}",
        f"data.sources=[{{shards: [{tiny_world['train']}], weight: 1.0, task_weights: {{describe: 1.0}}}}]"))
    source = PipelineSource(recipe, build_components(recipe).encoder, micro_batch=2)
    it = iter(source._factory(rank=0, world_size=1, epoch=0))
    tasks = {t for _ in range(20) for t in next(it)["tasks"]}
    assert tasks == {"vqa", "describe"}


def test_task_batch_sizes_are_global_and_split_like_batch_size(tiny_world, tmp_path):
    from mmdiff.training.recipe import PipelineSource, build_components

    recipe = load_recipe(DEBUG, _overrides(tiny_world, tmp_path, "data.group_by_task=true", "train.batch_size=4",
                                           "data.task_batch_sizes={vqa: 12, describe: 6}"))
    comps = build_components(recipe)
    # 2 ranks x 1 accumulation step (micro-batch 2): each rank's vqa batch holds 12 / 2 rows
    source = PipelineSource(recipe, comps.encoder, micro_batch=2)
    it = iter(source._factory(rank=0, world_size=2, epoch=0))
    sizes = {}
    for _ in range(40):
        b = next(it)
        sizes.setdefault(b["tasks"][0], set()).add(len(b["keys"]))
    assert sizes["vqa"] == {6} and sizes["caption"] == {2}, sizes
    with pytest.raises(ValueError, match="task_batch_sizes.describe=6 is not divisible"):
        PipelineSource(recipe, comps.encoder, micro_batch=1)._factory(rank=0, world_size=1, epoch=0)


def test_image_cache_gives_identical_batches_and_stays_bounded(tiny_world, tmp_path):
    from mmdiff.training.recipe import PipelineSource, build_components

    def batches(cache_mb):
        recipe = load_recipe(DEBUG, _overrides(tiny_world, tmp_path, "data.group_by_task=true",
                                               f"data.image_cache_mb={cache_mb}"))
        comps = build_components(recipe)
        it = iter(PipelineSource(recipe, comps.encoder, micro_batch=4)._factory(rank=0, world_size=1, epoch=0))
        return [next(it) for _ in range(90)], comps.encoder  # 360 rows: three passes over 120 scenes

    plain, enc0 = batches(0)
    cached, enc = batches(0.05)  # 52 kB: room for 4 of the 12 kB images, so entries are evicted
    assert enc0.cache_hits == enc0.cache_misses == 0
    assert enc.cache_hits > 0 and enc.cache_misses > 4
    assert 0 < enc._cache_bytes <= 0.05 * 2**20 and len(enc._cache) == 4
    for a, b in zip(plain, cached):
        assert a["keys"] == b["keys"]
        assert torch.equal(a["input_ids"], b["input_ids"])
        assert (a.get("pixel_values") is None) == (b.get("pixel_values") is None)
        if a.get("pixel_values") is not None:
            assert torch.equal(a["pixel_values"], b["pixel_values"])
    big, enc_big = batches(64)
    assert enc_big.cache_hits > enc.cache_hits and len(enc_big._cache) <= 120
    with pytest.raises(ConfigError, match="image_cache_mb must be >= 0"):
        load_recipe(DEBUG, _overrides(tiny_world, tmp_path, "data.image_cache_mb=-1"))


def test_batched_vq_encoding_gives_the_same_stream(tiny_world, tmp_path):
    """The pipeline hands the unified encoder its stream in chunks (encode_many): text-to-image
    targets are VQ-encoded in one batch.  Rows, their order and their contents equal those of the
    one-example-at-a-time path; an unreadable target rejects that example only."""
    from mmdiff.data.tasks import TaskExample
    from mmdiff.models.vq import VQConfig, VQTokenizer
    from mmdiff.training.recipe import PipelineSource, build_components

    torch.manual_seed(0)
    VQTokenizer(VQConfig(image_size=32, cell_grid=3, tile_size=11, patch_size=11, block_out_channels=[8],
                         norm_num_groups=4, latent_channels=8, num_vq_embeddings=16, vq_embed_dim=4)
                ).save_pretrained(tmp_path / "vq")
    recipe = load_recipe(DEBUG, _overrides(tiny_world, tmp_path, f"model.vq={tmp_path / 'vq'}",
                                           "data.task_weights={t2i: 1.0, vqa: 1.0, caption: 1.0}"))
    comps = build_components(recipe)
    enc = comps.encoder
    calls = []
    vq_encode = comps.vq.encode_to_codes
    comps.vq.encode_to_codes = lambda x: calls.append(len(x)) or vq_encode(x)

    class OneByOne:  # the encoder without encode_many
        pad_id = enc.pad_id

        def __call__(self, ex):
            return enc(ex)

    def stream(encoder):
        it = iter(PipelineSource(recipe, encoder, micro_batch=4)._factory(rank=0, world_size=1, epoch=0))
        return [next(it) for _ in range(30)]

    batched = stream(enc)
    assert max(calls) > 4  # several targets per VQ call
    calls.clear()
    single = stream(OneByOne())
    assert set(calls) == {1}
    assert sum("t2i" in b["tasks"] for b in single) >= 5
    for a, b in zip(batched, single):
        assert a["keys"] == b["keys"] and a["tasks"] == b["tasks"]
        assert torch.equal(a["input_ids"], b["input_ids"])
        if a.get("pixel_values") is not None:
            assert torch.equal(a["pixel_values"], b["pixel_values"])
    # one corrupt target among good ones: that example's error comes back in its place
    from PIL import Image

    img = Image.new("RGB", (32, 32), (255, 0, 0))
    good = TaskExample("t2i", "a", None, "a red square", img, {"shard": "s"})
    bad = TaskExample("t2i", "b", None, "a blue square", "not an image", {"shard": "s"})
    out = enc.encode_many([good, bad, good])
    assert isinstance(out[1], ValueError) and "target image" in str(out[1])
    assert torch.equal(torch.as_tensor(out[0].input_ids), torch.as_tensor(enc(good).input_ids))
    assert torch.equal(torch.as_tensor(out[2].input_ids), torch.as_tensor(out[0].input_ids))


def test_missing_weights_refused(tmp_path):
    from mmdiff.models.bundle import load_bundle

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no .safetensors"):
        load_bundle(tmp_path)


def _tiny_causal_lm(path, tokenizer_dir):
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=700, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    for f in Path(tokenizer_dir).iterdir():
        shutil.copy(f, path / f.name)
    return path


def _weights(model_dir):
    from safetensors.torch import load_file

    return load_file(str(Path(model_dir) / "model.safetensors"))


def test_llava_stage1_then_stage2(tiny_world, tmp_path):
    """Stage 1 trains only the projector (AR-initialised backbone, frozen tower); stage 2 trains all."""
    import torch

    from mmdiff.models.vision import VisionEncoder, tiny_vision_config
    from mmdiff.training.recipe import run_recipe

    lm = _tiny_causal_lm(tmp_path / "lm", tiny_world["tokenizer"])
    vis_dir = tmp_path / "siglip"
    VisionEncoder(tiny_vision_config("siglip")).save_pretrained(vis_dir)
    common = [f"data.shards=[{tiny_world['train']}]", "data.num_workers=0", "data.shuffle_buffer=20",
              f"model.vision.path={vis_dir}", "model.projector.pool=1", "model.max_length=128",
              "model.answer_lengths={caption: 40, vqa: 4}", "model.gradient_checkpointing=false",
              "train.max_steps=2", "train.batch_size=4", "train.grad_accum_steps=1", "train.precision=fp32",
              "train.warmup_steps=0", "train.save_every=0", "train.progress=false", "train.tensorboard=false"]
    s1 = load_recipe(REPO / "train/configs/llava-stage1.yaml",
                     [*common, f"model.tokenizer={lm}", f"model.init_from_causal_lm={lm}",
                      f"output_dir={tmp_path / 's1'}"])
    r1 = run_recipe(s1)
    w1 = _weights(r1["model_dir"])
    lm_w = _weights(lm)
    assert torch.equal(w1["backbone.layers.0.mlp.up_proj.weight"], lm_w["model.layers.0.mlp.up_proj.weight"])
    n = w1["backbone.embed_tokens.weight"].shape[0]  # the world tokenizer is smaller than the LM's vocab
    assert torch.equal(w1["backbone.embed_tokens.weight"], lm_w["model.embed_tokens.weight"][:n])
    vis_w = _weights(vis_dir)
    k = next(k for k in vis_w if k.endswith("encoder.layers.0.mlp.fc1.weight"))
    assert torch.equal(w1["vision.model." + k], vis_w[k])  # tower frozen in stage 1
    s2 = load_recipe(REPO / "train/configs/llava-stage2.yaml",
                     [*common, f"model.size={r1['model_dir']}", f"model.tokenizer={r1['model_dir']}",
                      f"train.init_from={r1['model_dir']}", "data.task_weights={caption: 1.0, vqa: 1.0}",
                      "train.param_groups={vision: 0.01}", "train.lr=0.01", f"output_dir={tmp_path / 's2'}"])
    w2 = _weights(run_recipe(s2)["model_dir"])
    assert not torch.equal(w2["vision.model." + k], vis_w[k])  # tower trains in stage 2
    assert not torch.equal(w2["backbone.layers.0.mlp.up_proj.weight"], w1["backbone.layers.0.mlp.up_proj.weight"])


def test_ar_then_diffusion_recipe(tiny_world, tmp_path):
    from mmdiff.training.recipe import run_recipe

    r = load_recipe(REPO / "train/configs/shapes-ar-then-diffusion.yaml",
                    _overrides(tiny_world, tmp_path, "objective.switch_step=2", "train.max_steps=4",
                               "train.batch_size=4", "train.warmup_steps=0", "train.log_every=1"))
    res = run_recipe(r)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    stages = [row.get("stage") for row in log if "stage" in row]
    assert res["step"] == 4 and stages[:2] == [0.0, 0.0] and stages[-1] == 1.0


def test_interrupted_run_resumes_exactly(tiny_world, tmp_path, monkeypatch):
    """A run stopped mid-way (after its step-4 checkpoint) and re-run gives the uninterrupted losses."""
    from mmdiff.training import recipe as recipe_mod

    def losses(out_dir):
        return [round(h["loss"], 6) for h in json.loads((out_dir / "history.json").read_text())]

    common = ["train.max_steps=6", "train.save_every=2", "train.batch_size=4", "train.warmup_steps=1"]
    full = tmp_path / "full"
    recipe_mod.run_recipe(load_recipe(DEBUG, _overrides(tiny_world, full, *common)))

    cut = tmp_path / "cut"
    original = recipe_mod.PipelineSource.iterator

    class Stop(Exception):
        pass

    def dying(self, start_batch, rank, world_size):
        for i, batch in enumerate(original(self, start_batch, rank, world_size)):
            if start_batch + i == 5:  # the 6th batch: after the step-4 checkpoint
                raise Stop
            yield batch

    monkeypatch.setattr(recipe_mod.PipelineSource, "iterator", dying)
    with pytest.raises(Stop):
        recipe_mod.run_recipe(load_recipe(DEBUG, _overrides(tiny_world, cut, *common)))
    monkeypatch.setattr(recipe_mod.PipelineSource, "iterator", original)
    res = recipe_mod.run_recipe(load_recipe(DEBUG, _overrides(tiny_world, cut, *common)))
    assert res["resumed_from"].endswith("step-00000004")
    assert losses(cut) == losses(full)


def test_exported_model_holds_the_ema_weights(tiny_world, tmp_path):
    """With train.ema_decay the exported model/ is the EMA of the weights (what users sample from);
    the raw weights stay in the last checkpoint."""
    import torch
    from safetensors.torch import load_file

    from mmdiff.training.recipe import run_recipe

    r = load_recipe(DEBUG, _overrides(tiny_world, tmp_path, "train.max_steps=4", "train.batch_size=4",
                                      "train.warmup_steps=0", "train.ema_decay=0.5", "train.save_every=4",
                                      "train.lr=0.01"))
    res = run_recipe(r)
    assert res["model_weights"] == "ema"
    exported = _weights(res["model_dir"])
    ckpt = sorted((tmp_path / "checkpoints").glob("step-*"))[-1]
    ema = load_file(str(ckpt / "ema.safetensors"))
    raw = load_file(str(ckpt / "model.safetensors"))
    name = next(k for k in ema if k.endswith("layers.0.mlp.up_proj.weight"))
    assert torch.equal(exported[name], ema[name])
    assert not torch.equal(exported[name], raw[name])  # the EMA lags the trained weights


def test_code_embedding_init_from_the_vq_tokenizer(tiny_world, tmp_path):
    """model.code_embedding_init: vq sets a fresh model's code rows from the tokenizer's code features
    (init_code_embeddings of VQTokenizer.code_features); random leaves them; vq without model.vq is refused."""
    from mmdiff.models.unified import init_code_embeddings
    from mmdiff.models.vq import VQConfig, VQTokenizer
    from mmdiff.training.recipe import build_components

    torch.manual_seed(0)
    vq = VQTokenizer(VQConfig(image_size=32, cell_grid=3, tile_size=11, patch_size=11, block_out_channels=[8],
                              norm_num_groups=4, latent_channels=8, num_vq_embeddings=16, vq_embed_dim=4))
    vq.save_pretrained(tmp_path / "vq")
    with pytest.raises(ConfigError, match="code_embedding_init"):
        load_recipe(DEBUG, _overrides(tiny_world, tmp_path / "a", "model.code_embedding_init=vq"))
    base = _overrides(tiny_world, tmp_path / "r", f"model.vq={tmp_path / 'vq'}", "data.task_weights={t2i: 1.0}")
    torch.manual_seed(1)
    plain = build_components(load_recipe(DEBUG, base))
    torch.manual_seed(1)
    informed = build_components(load_recipe(DEBUG, [*base, "model.code_embedding_init=vq"]))
    v, k = plain.processor.text_vocab_size, plain.vq.codebook_size
    random_rows = plain.model.backbone.get_input_embeddings().weight[v:v + k].clone()
    assert not torch.allclose(random_rows, informed.model.backbone.get_input_embeddings().weight[v:v + k])
    init_code_embeddings(plain.model, plain.vq.code_features(), text_vocab_size=v)  # what the option does
    for get in ("get_input_embeddings", "get_output_embeddings"):
        a = getattr(plain.model.backbone, get)().weight
        b = getattr(informed.model.backbone, get)().weight
        assert torch.allclose(a, b) and torch.equal(a[:v], b[:v])
    assert k == 16 and plain.processor.cfg.code_grid == (3, 3)


def test_code_embedding_init_after_init_from(tiny_world, tmp_path):
    """With train.init_from, code_embedding_init: vq sets the code rows after the loaded weights
    (at the loaded rows' scale, centred): run 2 starts from exactly init_code_embeddings of run 1's
    model; text rows are run 1's."""
    from mmdiff.models.bundle import load_bundle
    from mmdiff.models.unified import init_code_embeddings
    from mmdiff.models.vq import VQConfig, VQTokenizer
    from mmdiff.training.recipe import run_recipe

    torch.manual_seed(0)
    VQTokenizer(VQConfig(image_size=32, cell_grid=3, tile_size=11, patch_size=11, block_out_channels=[8],
                         norm_num_groups=4, latent_channels=8, num_vq_embeddings=16, vq_embed_dim=4)
                ).save_pretrained(tmp_path / "vq")
    common = [f"model.vq={tmp_path / 'vq'}", "data.task_weights={t2i: 1.0}", "train.max_steps=2",
              "train.batch_size=4", "train.warmup_steps=0", "train.save_every=0", "train.tensorboard=false"]
    r1 = run_recipe(load_recipe(DEBUG, _overrides(tiny_world, tmp_path / "r1", *common)))
    first = load_bundle(r1["model_dir"])
    v, k = first.processor.text_vocab_size, first.vq.codebook_size
    expected = first.model
    init_code_embeddings(expected, first.vq.code_features(), text_vocab_size=v)
    seen = []
    import mmdiff.training.recipe as recipe_mod

    def recording(model, features, text_vocab_size):  # the model right after each code-row init
        init_code_embeddings(model, features, text_vocab_size)
        seen.append({"emb": model.backbone.get_input_embeddings().weight.detach().clone(),
                     "head": model.backbone.get_output_embeddings().weight.detach().clone()})

    recipe_mod.init_code_embeddings = recording
    try:
        run_recipe(load_recipe(DEBUG, _overrides(
            tiny_world, tmp_path / "r2", *common, f"model.size={r1['model_dir']}", f"model.tokenizer={r1['model_dir']}",
            f"train.init_from={r1['model_dir']}", "model.code_embedding_init=vq")))
    finally:
        recipe_mod.init_code_embeddings = init_code_embeddings
    assert len(seen) == 2  # the fresh model at build time, then again once init_from's weights are in
    seen = seen[-1]
    for key, get in (("emb", "get_input_embeddings"), ("head", "get_output_embeddings")):
        want = getattr(expected.backbone, get)().weight.detach()
        assert torch.allclose(seen[key], want, atol=1e-6)
        assert torch.allclose(seen[key][v:v + k].mean(0), torch.zeros(want.shape[1]), atol=1e-5)  # centred


def test_projector_whitening_fitted_on_a_fresh_model_and_kept_by_init_from(tiny_world, tmp_path):
    """``model.projector.whiten_inputs``: a fresh build fits the whitening on the training images'
    tower features (mean 0, covariance ~I after it); training leaves it; ``init_from`` carries it."""
    from mmdiff.data.shards import read_samples
    from mmdiff.training.recipe import build_components, run_recipe

    common = ["model.projector.whiten_inputs=true", "train.max_steps=2", "train.save_every=0",
              "data.num_workers=0", "train.tensorboard=false"]
    s1 = load_recipe(DEBUG, _overrides(tiny_world, tmp_path / "s1", *common))
    fresh = build_components(s1)
    proj = fresh.model.projector
    assert not torch.equal(proj.input_whitening, torch.eye(proj.config.vision_dim))
    pixels = torch.stack([fresh.model.vision.image_transform()(s.image.convert("RGB"))
                          for s in read_samples(tiny_world["train"])])  # 120 images < 512: all of them
    with torch.no_grad():
        feats = fresh.model.vision.eval().encode_images(pixels)
    x = ((feats - proj.input_mean) @ proj.input_whitening).reshape(-1, feats.shape[-1]).double()
    assert x.mean(0).abs().max() < 1e-3
    eig = torch.linalg.eigvalsh(torch.cov(x.T))
    raw = torch.linalg.eigvalsh(torch.cov(feats.reshape(-1, feats.shape[-1]).double().T))
    assert raw[-1] / raw[-5:].mean() > 1.5  # the raw features are anisotropic ...
    assert eig.max() < 1.0 + 1e-3 and eig[-5:].min() > 0.8  # ... whitened ones are not (floored eigenvalues < 1)

    w1 = _weights(run_recipe(s1)["model_dir"])
    assert torch.equal(w1["projector.input_mean"], proj.input_mean)  # buffers: not trained
    assert torch.equal(w1["projector.input_whitening"], proj.input_whitening)
    m1 = tmp_path / "s1" / "model"
    s2 = load_recipe(DEBUG, _overrides(tiny_world, tmp_path / "s2", *common, f"model.size={m1}",
                                       f"model.tokenizer={m1}", f"train.init_from={m1}"))
    w2 = _weights(run_recipe(s2)["model_dir"])
    assert torch.equal(w2["projector.input_whitening"], w1["projector.input_whitening"])  # loaded, not refitted
    assert not torch.equal(w2["projector.mlp.0.weight"], w1["projector.mlp.0.weight"])


def test_readout_codes_recipe_trains_saves_and_generates(tiny_world, tmp_path):
    """model.readout_codes: understanding rows carry their image's VQ codes (the same codes the VQ gives,
    one example at a time or batched); training reports the read-out loss; the saved model lays out its
    generation canvases with the slots and the sampler leaves them masked."""
    from PIL import Image

    from mmdiff.data.tasks import TaskExample
    from mmdiff.generation import caption
    from mmdiff.models.bundle import load_bundle
    from mmdiff.models.vq import VQConfig, VQTokenizer
    from mmdiff.sampling import build_sampler
    from mmdiff.training.recipe import build_components, run_recipe

    torch.manual_seed(0)
    VQTokenizer(VQConfig(image_size=32, cell_grid=3, tile_size=11, patch_size=11, block_out_channels=[8],
                         norm_num_groups=4, latent_channels=8, num_vq_embeddings=16, vq_embed_dim=4)
                ).save_pretrained(tmp_path / "vq")
    with pytest.raises(ConfigError, match="readout_codes needs model.vq"):
        load_recipe(DEBUG, _overrides(tiny_world, tmp_path / "r0", "model.readout_codes=true"))
    with pytest.raises(ConfigError, match="model.readout_codes is false"):
        load_recipe(DEBUG, _overrides(tiny_world, tmp_path / "r0", "objective.image_codes.readout_given_prob=0.5"))
    over = _overrides(tiny_world, tmp_path / "r", f"model.vq={tmp_path / 'vq'}", "model.readout_codes=true",
                      "model.code_position_embedding=true", "data.task_weights={caption: 1.0, vqa: 1.0, t2i: 0.5}",
                      "train.max_steps=3", "train.batch_size=4", "train.save_every=0", "train.tensorboard=false")
    recipe = load_recipe(DEBUG, over)
    comps = build_components(recipe)
    img = Image.new("RGB", (32, 32))
    img.paste((255, 0, 0), (2, 2, 9, 9))
    ex = TaskExample("vqa", "k", img, "what color is the square?", "red", {"shard": "s"})
    row = comps.encoder(ex)
    pos = row.image_code_mask.nonzero().squeeze(-1)
    want = comps.vq.encode_to_codes(comps.encoder._target_pixels(img)[None])[0].reshape(-1)
    assert len(pos) == 9 and torch.equal(comps.processor.id_to_code(row.input_ids[pos]), want)
    assert row.target_mask[pos].all() and row.image_slots.sum() == comps.processor.cfg.num_image_tokens
    many = comps.encoder.encode_many([ex, TaskExample("t2i", "k", None, "a red square", img, {"shard": "s"}), ex])
    assert torch.equal(many[0].input_ids, row.input_ids) and torch.equal(many[2].input_ids, row.input_ids)

    result = run_recipe(recipe)
    logs = [json.loads(line) for line in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    assert any("readout_nll" in r and r["readout_nll"] > 0 for r in logs)
    cfg = json.loads((Path(result["model_dir"]) / "config.json").read_text())
    assert cfg["processor"]["readout_codes"] is True
    bundle = load_bundle(result["model_dir"])
    assert bundle.processor.num_readout_codes == 9
    px = bundle.image_transform(img)
    canvas = bundle.processor.generation_inputs("caption", pixel_values=px, gen_length=8)
    batch = bundle.processor.collate([canvas], left_pad=True)
    out = build_sampler(steps=8, block_length=8).generate(
        bundle.model, batch, torch.Generator().manual_seed(0), mask_token_id=bundle.processor.mask_id,
        eos_token_id=bundle.processor.eos_id, text_vocab_size=bundle.processor.text_vocab_size)
    slots = batch["image_code_mask"][0]
    assert slots.sum() == 9 and (out.tokens[0][slots] == bundle.processor.mask_id).all()
    assert not (out.tokens[0][batch["target_mask"][0]] == bundle.processor.mask_id).any()
    assert isinstance(caption(bundle, img, steps=8, gen_length=8).text, str)
