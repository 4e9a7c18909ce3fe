"""Tests for mmdiff.evaluation.metrics: VQA, BLEU / CIDEr-D (vs pycocoevalcap), Shapes
attribute accuracy and description P/R/F1."""

from __future__ import annotations

import contextlib
import io
import itertools
import math
import random

import numpy as np
import pytest

from mmdiff.evaluation.metrics import (
    bleu,
    caption_attribute_accuracy,
    caption_attribute_scores,
    caption_scores,
    cider_d,
    describe_prf,
    describe_prf_corpus,
    normalize_answer,
    parse_description,
    tokenize_caption,
    vqa_exact_match,
    vqa_scores,
    vqa_soft_accuracy,
)

# =============================================================================================
# VQA
# =============================================================================================


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Two dogs.", "2 dogs"),
        ("isnt", "isn't"),
        ("isn't", "isn't"),
        ("a red circle", "red circle"),
        ("The Cat's toy", "cat's toy"),
        ("an apple", "apple"),
        ("None", "0"),
        ("ten", "10"),
        ("whats up", "what's up"),
        ("10,000", "10000"),  # comma between digits: punctuation deleted, not spaced
        ("2.5", "2.5"),  # a period followed by a digit stays
        ("2.", "2"),
        ("yes!", "yes"),
        ("black-and-white", "black and white"),  # no space next to '-': becomes a space
        ("hot - dog", "hot dog"),  # '-' touches a space: deleted
        ("  Red\tcircle\n", "red circle"),
        ("(top) left", "top left"),
        ("Im", "im"),  # the official table's capitalised keys never match
        ("somebody'd", "somebodyd"),  # official table quirk kept
        ("", ""),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_exact_match():
    assert vqa_exact_match("Two.", "2") == 1.0
    assert vqa_exact_match("the top left", "top left") == 1.0
    assert vqa_exact_match("top", "top left") == 0.0


def _official_soft(pred, answers):
    """VQAv2 by its definition: mean over the 10-choose-9 subsets of min(1, matches / 3)."""
    p = normalize_answer(pred)
    accs = []
    for subset in itertools.combinations(range(len(answers)), len(answers) - 1):
        m = sum(normalize_answer(answers[i]) == p for i in subset)
        accs.append(min(1.0, m / 3))
    return sum(accs) / len(accs)


@pytest.mark.parametrize(
    "hits, expected",
    # By hand: leaving out a match leaves hits-1 matches, leaving out another answer leaves hits.
    # 1 hit: (1*0 + 9*(1/3)) / 10 = 0.3; 2 hits: (2*(1/3) + 8*(2/3)) / 10 = 0.6;
    # 3 hits: (3*(2/3) + 7*1) / 10 = 0.9; 4+ hits: 1.
    [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)],
)
def test_soft_accuracy_ten_answers_by_hand(hits, expected):
    answers = ["two"] * hits + ["three", "four", "blue", "1", "red", "no", "yes", "x", "y", "z"][
        : 10 - hits
    ]
    assert len(answers) == 10
    assert vqa_soft_accuracy("2", answers) == pytest.approx(expected, abs=1e-12)
    assert vqa_soft_accuracy("2", answers) == pytest.approx(_official_soft("2", answers), abs=1e-12)


def test_soft_accuracy_random_against_subset_definition():
    rng = random.Random(0)
    pool = ["2", "two", "red", "Red.", "circle", "a circle", "blue"]
    for _ in range(200):
        answers = [rng.choice(pool) for _ in range(10)]
        pred = rng.choice(pool)
        assert vqa_soft_accuracy(pred, answers) == pytest.approx(_official_soft(pred, answers), abs=1e-12)


def test_soft_accuracy_fewer_answers():
    assert vqa_soft_accuracy("red", ["Red"]) == 1.0  # one answer: exact match
    assert vqa_soft_accuracy("red", ["blue"]) == 0.0
    assert vqa_soft_accuracy("red", "red") == 1.0  # a bare string is one answer
    assert vqa_soft_accuracy("red", ["red", "red"]) == 1.0  # k = 1
    assert vqa_soft_accuracy("red", ["red", "blue"]) == 0.5  # (0 + 1) / 2
    assert vqa_soft_accuracy("red", ["red"] * 4) == 1.0  # unanimous: always 1
    # n = 4, k = 3, 2 hits: leave a hit out -> 1/3 (twice), leave a miss out -> 2/3 (twice).
    assert vqa_soft_accuracy("red", ["red", "red", "x", "y"]) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        vqa_soft_accuracy("red", [])


def test_vqa_scores_overall_and_per_type():
    records = [
        {"pred": "red", "answer": "red", "type": "color"},
        {"pred": "Blue.", "answer": "green", "type": "color"},
        {"pred": "two", "answer": "2", "type": "count"},
        {"pred": "2", "answers": ["2", "2", "3", "3", "3", "3", "3", "3", "3", "3"], "type": "count"},
    ]
    out = vqa_scores(records)
    assert out["count"] == 4
    # Last record: exact match against the majority answer "3" -> 0; soft: 2 hits -> 0.6.
    assert out["exact_match"] == pytest.approx((1 + 0 + 1 + 0) / 4)
    assert out["soft_accuracy"] == pytest.approx((1 + 0 + 1 + 0.6) / 4)
    assert out["per_type"]["color"] == {"exact_match": 0.5, "soft_accuracy": 0.5, "count": 2}
    assert out["per_type"]["count"]["soft_accuracy"] == pytest.approx(0.8)
    assert out["per_type"]["count"]["exact_match"] == pytest.approx(0.5)
    empty = vqa_scores([])
    assert empty["count"] == 0 and math.isnan(empty["exact_match"])
    with pytest.raises(ValueError):
        vqa_scores([{"pred": "x"}])


# =============================================================================================
# Captions vs pycocoevalcap
# =============================================================================================

_VOCAB = ["a", "red", "circle", "square", "at", "the", "top", "left", "and", "small", "large", "blue"]


def _random_corpus(rng: random.Random, n_images: int, max_refs: int = 5, max_len: int = 12):
    refs, hyps = {}, {}
    for i in range(n_images):
        refs[i] = [
            " ".join(rng.choice(_VOCAB) for _ in range(rng.randint(1, max_len)))
            for _ in range(rng.randint(1, max_refs))
        ]
        hyps[i] = [" ".join(rng.choice(_VOCAB) for _ in range(rng.randint(1, max_len)))]
    return refs, hyps


def _reference_scores(refs, hyps):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its totals
        b, b_img = Bleu(4).compute_score(refs, hyps)
    c, c_img = Cider().compute_score(refs, hyps)
    return b, b_img, c, c_img


def _assert_equal_to_reference(refs, hyps):
    b_ref, b_img_ref, c_ref, c_img_ref = _reference_scores(refs, hyps)
    b, b_img = bleu(refs, hyps, tokenize=False)
    c, c_img = cider_d(refs, hyps, tokenize=False)
    np.testing.assert_allclose(b, b_ref, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(np.array(b_img), np.array(b_img_ref), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(c, c_ref, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(np.array(c_img), np.array(c_img_ref), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("seed", range(12))
def test_bleu_cider_equal_pycocoevalcap_random(seed):
    rng = random.Random(seed)
    refs, hyps = _random_corpus(rng, n_images=rng.randint(2, 9))
    _assert_equal_to_reference(refs, hyps)


@pytest.mark.parametrize(
    "refs, hyps",
    [
        # one image (CIDEr's idf is log(1) - log(1) = 0 everywhere)
        ({"a": ["a red circle at the top left"]}, {"a": ["a red circle"]}),
        # hypothesis much shorter than every reference (brevity penalty, few n-grams)
        (
            {1: ["a small red circle at the top left and a blue square", "a red circle top left"],
             2: ["a large blue square at the left", "blue square at the left"]},
            {1: ["circle"], 2: ["blue"]},
        ),
        # repeated words: clipping of candidate counts by the references
        (
            {1: ["a a red red circle", "the red circle"], 2: ["a blue square", "blue blue square"],
             3: ["red square", "a red square at the top"]},
            {1: ["red red red red red"], 2: ["blue blue blue square"], 3: ["a a a a a a a"]},
        ),
        # equal-distance reference lengths (closest: ties -> shorter) and a perfect hypothesis
        (
            {1: ["a b c d", "a b c d e f"], 2: ["the red circle at the top", "red circle"]},
            {1: ["a b c d e"], 2: ["the red circle at the top"]},
        ),
        # a one-word hypothesis against long references (CIDEr's bigram-count length)
        (
            {1: ["red circle at the top left", "red"], 2: ["blue square"], 3: ["x y z"]},
            {1: ["red"], 2: ["blue square blue square blue square"], 3: ["z"]},
        ),
    ],
)
def test_bleu_cider_equal_pycocoevalcap_edge_cases(refs, hyps):
    _assert_equal_to_reference(refs, hyps)


def test_tokenized_scores_equal_reference_on_tokenized_input():
    rng = random.Random(7)
    refs, hyps = _random_corpus(rng, n_images=5)
    decorate = lambda s: s.capitalize().replace(" at ", ", at ") + "."  # noqa: E731
    raw_refs = {k: [decorate(r) for r in v] for k, v in refs.items()}
    raw_hyps = {k: decorate(v[0]) for k, v in hyps.items()}  # bare strings are accepted too
    tok_refs = {k: [tokenize_caption(r) for r in v] for k, v in raw_refs.items()}
    tok_hyps = {k: [tokenize_caption(v)] for k, v in raw_hyps.items()}
    assert tok_refs == refs and tok_hyps == hyps
    b_ref, _, c_ref, _ = _reference_scores(tok_refs, tok_hyps)
    np.testing.assert_allclose(bleu(raw_refs, raw_hyps)[0], b_ref, rtol=1e-9)
    np.testing.assert_allclose(cider_d(raw_refs, raw_hyps)[0], c_ref, rtol=1e-9)
    scores = caption_scores(raw_refs, raw_hyps)
    assert scores["BLEU-4"] == pytest.approx(b_ref[3], rel=1e-9)
    assert scores["CIDEr-D"] == pytest.approx(c_ref, rel=1e-9)


def test_tokenize_caption():
    assert tokenize_caption("A Red circle, at the top-left.") == "a red circle at the top left"
    assert tokenize_caption("It isn't 'quoted'!") == "it isn't quoted"
    assert tokenize_caption("snake_case  words") == "snake case words"
    s = tokenize_caption("Hello, World... (again)")
    assert s == "hello world again" and tokenize_caption(s) == s


def test_bleu_hand_computed_perfect_and_zero():
    refs = {0: ["a red circle at the top"]}
    b, per = bleu(refs, {0: "a red circle at the top"})
    np.testing.assert_allclose(b, [1.0] * 4, rtol=1e-6)
    b, _ = bleu(refs, {0: "green"})
    assert b[0] < 1e-9  # no unigram matches
    # unigram precision 2/2 ("red circle"), ref length 6, c = 2: BP = exp(1 - 6/2).
    b, _ = bleu(refs, {0: "red circle"}, n=1)
    assert b[0] == pytest.approx(math.exp(1 - 3), rel=1e-6)


def test_caption_input_validation():
    with pytest.raises(ValueError):
        bleu({1: ["a"]}, {2: ["a"]})
    with pytest.raises(ValueError):
        cider_d({1: ["a"]}, {1: ["a", "b"]})
    with pytest.raises(ValueError):
        bleu({1: []}, {1: ["a"]})


# =============================================================================================
# Shapes attribute accuracy
# =============================================================================================

GT = [
    {"shape": "circle", "color": "red", "size": "small", "cell": "top left"},
    {"shape": "square", "color": "green", "size": "large", "cell": "center"},
]


def test_attribute_accuracy_perfect_any_template_and_order():
    from mmdiff.world.render import Scene, SceneObject
    from mmdiff.world.text import CAPTION_TEMPLATES

    objs = tuple(SceneObject(bbox=(0, 0, 1, 1), **o) for o in GT)
    for t in CAPTION_TEMPLATES:
        for order in (objs, objs[::-1]):
            out = caption_attribute_accuracy(t.render(order), objs)  # SceneObjects accepted
            assert out["overall"] == 1.0 and out["object"] == 1.0 and out["parsed"]
    assert Scene(32, objs).objects == objs


def test_attribute_accuracy_one_wrong_colour():
    out = caption_attribute_accuracy(
        "a large blue square in the center and a small red circle at the top left", GT
    )
    # Matched by best agreement despite the order; 7 of 8 (object, attribute) pairs right.
    assert out["color"] == 0.5 and out["shape"] == 1.0 and out["cell"] == 1.0 and out["size"] == 1.0
    assert out["overall"] == pytest.approx(7 / 8)
    assert out["object"] == 0.5
    assert (out["num_gt"], out["num_pred"]) == (2, 2)


def test_attribute_accuracy_missing_and_extra_objects():
    missing = caption_attribute_accuracy("a small red circle at the top left", GT)
    assert missing["overall"] == 0.5 and missing["color"] == 0.5 and missing["object"] == 0.5
    extra = caption_attribute_accuracy(
        "a small red circle at the top left and a large green square in the center and "
        "a small cyan triangle at the bottom",
        GT,
    )
    # D = max(2, 3) = 3 slots; the extra object fills one with four wrong attributes.
    assert extra["overall"] == pytest.approx(8 / 12)
    assert extra["shape"] == pytest.approx(2 / 3) and extra["object"] == pytest.approx(2 / 3)


def test_attribute_accuracy_missing_size_and_partial_match():
    out = caption_attribute_accuracy("a red circle at the top left and a green triangle at the center", GT)
    # Object 1: size missing -> 3/4; object 2: shape and size wrong -> 2/4.
    assert out["size"] == 0.0 and out["shape"] == 0.5 and out["color"] == 1.0 and out["cell"] == 1.0
    assert out["overall"] == pytest.approx(5 / 8) and out["object"] == 0.0


def test_attribute_accuracy_best_matching_not_greedy_order():
    gt = [
        {"shape": "circle", "color": "red", "size": "small", "cell": "top"},
        {"shape": "square", "color": "red", "size": "large", "cell": "left"},
    ]
    # Pred A (small red circle, left) agrees with gt 0 on 3 attributes and gt 1 on 2; pred B
    # (small blue circle, top) with gt 0 on 3 and gt 1 on 0.  Greedy in caption order would
    # give A->gt0, B->gt1 (3 + 0); the optimal pairing is A->gt1, B->gt0 (2 + 3).
    out = caption_attribute_accuracy(
        "a small red circle at the left and a small blue circle at the top", gt
    )
    assert out["overall"] == pytest.approx(5 / 8)
    assert (out["color"], out["shape"], out["cell"], out["size"]) == (0.5, 0.5, 1.0, 0.5)


def test_attribute_accuracy_unparsable():
    for text in ("hello world", "", "a red circle"):  # no cell -> parse_caption raises
        out = caption_attribute_accuracy(text, GT)
        assert out["overall"] == 0.0 and out["parsed"] is False and out["num_pred"] == 0
    assert caption_attribute_accuracy("", [])["overall"] == 1.0  # nothing to get wrong


def test_attribute_scores_micro():
    out = caption_attribute_scores(
        ["a small red circle at the top left", "nonsense"], [GT, GT[:1]]
    )
    # Slots: 2 + 1 = 3; correct pairs: 4 + 0.
    assert out["overall"] == pytest.approx(4 / 12)
    assert out["parse_rate"] == 0.5 and out["count"] == 2


# =============================================================================================
# Description P/R/F1
# =============================================================================================


def test_parse_description_canonical_round_trip():
    from mmdiff.world.render import Scene, SceneObject
    from mmdiff.world.text import description

    objs = (
        SceneObject("circle", "red", "small", "top left", (0, 0, 1, 1)),
        SceneObject("triangle", "cyan", "large", "bottom right", (0, 0, 1, 1)),
        SceneObject("square", "green", "large", "center", (0, 0, 1, 1)),
    )
    text = description(Scene(32, objs))
    parsed = parse_description(text)
    assert parsed["count"] == 3 and parsed["unparsed"] == []
    assert sorted(o["cell"] for o in parsed["objects"]) == sorted(o.cell for o in objs)
    out = describe_prf(text, objs)
    assert (out["precision"], out["recall"], out["f1"]) == (1.0, 1.0, 1.0)
    assert out["count_correct"]
    one = description(Scene(32, objs[:1]))
    assert parse_description(one)["count"] == 1 and describe_prf(one, objs[:1])["f1"] == 1.0


def test_describe_prf_hand_made():
    pred = (
        "there are 3 shapes. a small red circle at the top left. a large green square at the "
        "center. a small blue triangle at the bottom."
    )
    out = describe_prf(pred, GT)
    assert (out["tp"], out["fp"], out["fn"]) == (2, 1, 0)
    assert out["precision"] == pytest.approx(2 / 3) and out["recall"] == 1.0
    assert out["f1"] == pytest.approx(0.8)
    assert out["count_correct"] is False

    # One attribute wrong (size) -> the object does not match at all.
    out = describe_prf(
        "there are 2 shapes. a large red circle at the top left. a large green square at the center.",
        GT,
    )
    assert (out["tp"], out["fp"], out["fn"]) == (1, 1, 1)
    assert out["precision"] == out["recall"] == out["f1"] == 0.5
    assert out["count_correct"] is True

    # An unreadable sentence is a false positive; "in the center" is read too.
    out = describe_prf(
        "there are two shapes. a small red circle at the top left. a purple blob. "
        "a large green square in the center",
        GT,
    )
    assert (out["tp"], out["fp"], out["fn"], out["unparsed"]) == (2, 1, 0, 1)

    # Duplicates are matched as a multiset.
    dup = "a small red circle at the top left. a small red circle at the top left."
    out = describe_prf(dup, GT)
    assert (out["tp"], out["fp"], out["fn"]) == (1, 1, 1)

    empty = describe_prf("", GT)
    assert (empty["precision"], empty["recall"], empty["f1"]) == (0.0, 0.0, 0.0)
    assert describe_prf("", [])["f1"] == 1.0


def test_describe_prf_corpus_micro():
    preds = [
        "there are 2 shapes. a small red circle at the top left. a large green square at the center.",
        "there is 1 shape. a small blue triangle at the bottom.",
    ]
    gts = [GT, [{"shape": "square", "color": "blue", "size": "small", "cell": "bottom"}]]
    out = describe_prf_corpus(preds, gts)
    assert (out["tp"], out["fp"], out["fn"]) == (2, 1, 1)
    assert out["precision"] == pytest.approx(2 / 3) and out["recall"] == pytest.approx(2 / 3)
    assert out["f1"] == pytest.approx(2 / 3) and out["count_accuracy"] == 1.0
