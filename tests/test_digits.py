"""scikit-learn's handwritten digits as shards: counts, split, captions, pixels, determinism."""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from mmdiff.world import write_digits
from mmdiff.world.digits import DIGIT_WORDS, digit_images, digit_split

N_DIGITS = 1797


def _read(shards: list[str]) -> dict[str, dict]:
    samples: dict[str, dict] = {}
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    return out, write_digits(out, image_size=32, seed=0, test_fraction=0.2)


def test_counts_and_layout(written):
    out, summary = written
    train, test = summary["splits"]["train"], summary["splits"]["test"]
    assert summary["samples"] == N_DIGITS == train["samples"] + test["samples"]
    assert 340 <= test["samples"] <= 380
    assert all(re.search(r"/train/digits-train-\d{5}\.tar$", s) for s in train["shards"])
    assert all(re.search(r"/test/digits-test-\d{5}\.tar$", s) for s in test["shards"])
    assert len(train["shards"]) == 2 and len(test["shards"]) == 1  # 1000 per shard


def test_splits_are_disjoint_stratified_and_labels_match(written):
    out, summary = written
    digits = load_digits()
    seen: dict[str, set[int]] = {}
    per_class: dict[str, Counter] = {}
    for split in ("train", "test"):
        samples = _read(summary["splits"][split]["shards"])
        indices = set()
        per_class[split] = Counter()
        for key, files in samples.items():
            meta = json.loads(files["json"])
            index = meta["index"]
            assert key == f"digit_{index:04d}" and meta["split"] == split
            label = int(digits.target[index])
            word = DIGIT_WORDS[label]
            assert meta["label"] == label
            assert files["txt"].decode() == meta["caption"] == f"a handwritten digit {word}"
            assert meta["qa"] == [{"question": "which digit is this?", "answer": word, "type": "digit"}]
            image = Image.open(io.BytesIO(files["png"]))
            assert image.mode == "RGB" and image.size == (32, 32)
            indices.add(index)
            per_class[split][label] += 1
        seen[split] = indices
    assert not seen["train"] & seen["test"]
    assert seen["train"] | seen["test"] == set(range(N_DIGITS))
    for label in range(10):
        total = per_class["train"][label] + per_class["test"][label]
        assert abs(per_class["test"][label] - 0.2 * total) <= 1, label


def test_same_arguments_give_identical_shards_and_seed_changes_split(written, tmp_path):
    out, summary = written
    again = write_digits(tmp_path / "again", image_size=32, seed=0)
    for split in ("train", "test"):
        for a, b in zip(summary["splits"][split]["shards"], again["splits"][split]["shards"]):
            assert open(a, "rb").read() == open(b, "rb").read()
    labels = load_digits().target
    assert set(digit_split(labels, 0.2, 0)["test"]) != set(digit_split(labels, 0.2, 1)["test"])


def test_pixels_come_from_the_scans():
    digits = load_digits()
    scans = digits.images[:20]
    exact = digit_images(scans, 32, resample="nearest")
    expected = np.rint(scans / 16 * 255).astype(np.uint8).repeat(4, axis=1).repeat(4, axis=2)
    assert np.array_equal(exact[:, :, :, 0], expected)
    assert np.array_equal(exact[..., 0], exact[..., 2])
    smooth = digit_images(scans, 64)
    assert smooth.shape == (20, 64, 64, 3)
    # bilinear keeps the ink where the scan has it: correlation with the nearest upscale is high
    near64 = digit_images(scans, 64, resample="nearest").astype(float)
    corr = np.corrcoef(smooth.astype(float).ravel(), near64.ravel())[0, 1]
    assert corr > 0.9


def test_rejects_bad_arguments(tmp_path):
    labels = np.arange(20) % 10
    with pytest.raises(ValueError, match="test_fraction"):
        digit_split(labels, 1.5, 0)
    with pytest.raises(ValueError, match="'cubic'"):
        digit_images(np.zeros((1, 8, 8)), 32, resample="cubic")
    with pytest.raises(ValueError, match="image_size"):
        digit_images(np.zeros((1, 8, 8)), 4)
