"""Evaluation metrics: VQA accuracy, caption BLEU / CIDEr-D, Shapes attribute accuracy, and
description precision / recall / F1.

Everything here is pure Python (plus ``scipy.optimize.linear_sum_assignment`` for matching
objects; scipy comes with scikit-learn).  All scores are fractions in [0, 1] except CIDEr-D,
which is on its usual 0-10 scale.

VQA
---
``normalize_answer`` is the VQAv2 evaluation's answer normalisation (``vqaEval.py``): newlines
and tabs become spaces, the text is stripped and lower-cased, then

1. *punctuation*: each of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` is deleted when it
   touches a space somewhere in the text (``p + " "`` or ``" " + p`` occurs) or when the text
   holds a comma between two digits (``10,000``); otherwise it is replaced by a space.  Then every
   period that is not followed by a digit is deleted (``2.5`` keeps its period, ``dogs.`` loses
   it).  The original regex ``(?!<=\\d)(\\.)(?!\\d)`` has a typo'd look-behind that never fires,
   so a period *preceded* by a digit is deleted too (``2.`` -> ``2``); we keep that behaviour.
2. *digits and articles*: words are split on whitespace, number words ``none/zero..ten`` become
   digits (``none`` -> ``0``), the articles ``a an the`` are dropped, and each word found in the
   contraction table (``isnt`` -> ``isn't``, ``whats`` -> ``what's``...) is replaced.  Words are
   re-joined with single spaces.

The tables are the official ones, quirks included (``somebody'd`` -> ``somebodyd``; the keys
``Im``, ``Ive``, ``Id've``, ``I'dve`` are capitalised and so never match lower-cased text).
Unlike the official script, which only normalises ground-truth answers when annotators disagree,
we always normalise both sides (our ground truth is generated, not pre-normalised).

``vqa_soft_accuracy(pred, answers)`` with n = len(answers):

* n >= 2: the VQAv2 formula generalised: the mean over the n leave-one-out subsets (n-1
  answers each) of ``min(1, #matches in the subset / k)`` with ``k = min(3, n - 1)``.  For the
  standard n = 10 this is exactly VQAv2's average over the 10 choose-9 subsets of
  ``min(1, #matches / 3)``; for fewer answers the threshold shrinks so that unanimous agreement
  still scores 1 (e.g. n = 2: 1 if both match, 0.5 if one does).
* n == 1: exact match.   n == 0: ValueError.

Captions
--------
``bleu`` and ``cider_d`` reproduce ``pycocoevalcap``'s ``Bleu(4).compute_score`` (option
``closest``) and ``Cider().compute_score`` on the same whitespace-tokenised strings; by default
both first apply ``tokenize_caption`` (lower case, punctuation removed) to references and
hypotheses.  Facts reproduced from pycocoevalcap:

* BLEU: clipped n-gram counts against the per-n-gram maximum over the references; per image the
  "closest" reference length (ties -> the shorter one); corpus BLEU-k = (Π_{j<=k} (correct_j +
  1e-15) / (guess_j + 1e-9))^(1/k) on counts summed over the corpus, times the brevity penalty
  exp(1 - r/c) when c/r < 1 with c = (testlen + 1e-15), r = (reflen + 1e-9).  Per-image scores
  are the same formula on one image's counts.
* CIDEr-D: n = 1..4 tf-idf vectors with idf = log(#images) - log(max(1, df)), df counted over
  the reference sets of the evaluated images (an n-gram counts once per image); for each
  reference, per n the clipped cosine Σ min(h, r)·r / (|h|·|r|) (no division when a norm is 0),
  times the Gaussian length penalty exp(-δ²/(2σ²)), σ = 6.  pycocoevalcap measures the
  lengths in δ by counting *bigrams* (len - 1 for non-empty text, 0 for one word), and so do we.
  Image score = 10 · mean over n · mean over references; corpus score = mean over images.

Shapes attribute accuracy (captions)
------------------------------------
``caption_attribute_accuracy(pred_caption, gt_objects)``: the prediction is parsed with
``mmdiff.world.parse_caption`` (an unparsable caption, raised ValueError or empty list, counts
as no predicted objects).  Predicted and ground-truth objects are paired one-to-one by an
optimal assignment maximising the total number of agreeing attributes (colour, shape, cell,
size).  With G ground-truth and P predicted objects and D = max(G, P) object slots, every
unpaired object (a missed ground-truth object or an extra prediction) fills a slot with all four
attributes wrong.  Then

* ``<attr>`` accuracy = (# paired objects whose attribute agrees) / D, for attr in
  ``color, shape, cell, size`` (a missing size, ``None``, never agrees);
* ``overall`` = (# correct (object, attribute) pairs) / (4·D) = mean of the four;
* ``object`` = (# paired objects with all four attributes right) / D.

D = 0 (no ground truth and nothing predicted) scores 1.  ``caption_attribute_scores`` sums the
counts over a corpus (micro average).

Description precision / recall / F1
------------------------------------
``parse_description`` reads the canonical long description (``there are 2 shapes. a small red
circle at the top left. a large green square at the center.``): sentences split on ``.``, the
``there is/are N shape(s)`` head gives the stated count, every other non-empty sentence must be
``[a|an] [size] <color> <shape> (at|in) the <cell>``.  ``describe_prf`` matches predicted to
ground-truth objects as multisets of (shape, colour, size, cell) tuples — an object is a true
positive only when all four agree.  Sentences that do not parse count as predicted objects that
match nothing (false positives).  P = TP / #pred, R = TP / #gt, F1 = 2PR/(P+R); an empty
denominator gives 1 when both sides are empty, else 0.  ``describe_prf_corpus`` is the micro
aggregate (TP, FP, FN summed over the corpus).
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from typing import Any, Iterable, Mapping, Sequence

from mmdiff.world.spec import CELLS, COLORS, COUNT_WORDS, SHAPES, SIZES

__all__ = [
    "normalize_answer",
    "vqa_exact_match",
    "vqa_soft_accuracy",
    "vqa_scores",
    "tokenize_caption",
    "bleu",
    "cider_d",
    "caption_scores",
    "ATTRIBUTES",
    "caption_attribute_accuracy",
    "caption_attribute_scores",
    "parse_description",
    "describe_prf",
    "describe_prf_corpus",
]

# =============================================================================================
# VQA
# =============================================================================================

# The VQAv2 evaluation tables (facts from the official vqaEval.py).
_CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}  # fmt: skip
_MANUAL_MAP: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = frozenset({"a", "an", "the"})
_PUNCT: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
    ">", "<", "@", "`", ",", "?", "!",
)  # fmt: skip
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
# The official regex's look-behind is a no-op.  (It also passes re.UNICODE as sub's *count*,
# i.e. strips at most 32 periods; we strip them all.)
_PERIOD_STRIP = re.compile(r"\.(?!\d)")


def _process_punctuation(text: str) -> str:
    # The "delete instead of space" test looks at the *input* text, for every mark.
    digit_comma = _COMMA_BETWEEN_DIGITS.search(text) is not None
    out = text
    for p in _PUNCT:
        if digit_comma or (p + " ") in text or (" " + p) in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def _process_digit_article(text: str) -> str:
    words = []
    for word in text.lower().split():
        word = _MANUAL_MAP.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def normalize_answer(s: str) -> str:
    """VQAv2 answer normalisation (see the module docstring): ``"Two dogs."`` -> ``"2 dogs"``."""
    s = str(s).replace("\n", " ").replace("\t", " ").strip().lower()
    return _process_digit_article(_process_punctuation(s))


def vqa_exact_match(pred: str, gt: str) -> float:
    """1.0 when the normalised prediction equals the normalised answer, else 0.0."""
    return float(normalize_answer(pred) == normalize_answer(gt))


def vqa_soft_accuracy(pred: str, answers: Sequence[str]) -> float:
    """VQAv2 accuracy of ``pred`` against the annotators' ``answers`` (module docstring).

    With 10 answers: mean over the 10 leave-one-out subsets of min(1, #matches / 3).
    """
    if isinstance(answers, str):
        answers = [answers]
    n = len(answers)
    if n == 0:
        raise ValueError("vqa_soft_accuracy needs at least one reference answer")
    p = normalize_answer(pred)
    hits = [normalize_answer(a) == p for a in answers]
    if n == 1:
        return float(hits[0])
    k = min(3, n - 1)
    total_hits = sum(hits)
    # Leaving out answer i leaves total_hits - hits[i] matches among the other n - 1.
    return sum(min(1.0, (total_hits - h) / k) for h in hits) / n


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def vqa_scores(records: Iterable[Mapping[str, Any]]) -> dict:
    """Aggregate VQA metrics overall and per question type.

    Each record: ``pred`` (str), ``answer`` (str, the reference answer) and/or ``answers``
    (list of annotator answers), and optionally ``type``.  ``exact_match`` compares against
    ``answer`` (or, when absent, the most frequent normalised answer of ``answers``, ties ->
    first seen); ``soft_accuracy`` uses ``answers`` when present, else ``[answer]`` (so it then
    equals exact match).  Returns::

        {"exact_match": float, "soft_accuracy": float, "count": int,
         "per_type": {type: {"exact_match", "soft_accuracy", "count"}}}

    Means are over records (NaN when there are none); records without ``type`` are grouped
    under ``"unknown"``.
    """
    em_all: list[float] = []
    soft_all: list[float] = []
    by_type: dict[str, tuple[list[float], list[float]]] = defaultdict(lambda: ([], []))
    for i, r in enumerate(records):
        pred = r.get("pred")
        if pred is None:
            raise ValueError(f"record {i} has no 'pred'")
        answers = r.get("answers")
        answer = r.get("answer")
        if answers is not None and isinstance(answers, str):
            answers = [answers]
        if answer is None:
            if not answers:
                raise ValueError(f"record {i} has neither 'answer' nor 'answers'")
            answer = Counter(normalize_answer(a) for a in answers).most_common(1)[0][0]
        if not answers:
            answers = [answer]
        em = vqa_exact_match(pred, answer)
        soft = vqa_soft_accuracy(pred, answers)
        em_all.append(em)
        soft_all.append(soft)
        ems, softs = by_type[str(r.get("type", "unknown"))]
        ems.append(em)
        softs.append(soft)
    return {
        "exact_match": _mean(em_all),
        "soft_accuracy": _mean(soft_all),
        "count": len(em_all),
        "per_type": {
            t: {"exact_match": _mean(e), "soft_accuracy": _mean(s), "count": len(e)}
            for t, (e, s) in sorted(by_type.items())
        },
    }


# =============================================================================================
# Captions: BLEU and CIDEr-D
# =============================================================================================

_WORD_APOSTROPHE = re.compile(r"(?<=\w)'(?=\w)")
_NON_WORD = re.compile(r"[^\w\s\u0001]+")


def tokenize_caption(s: str) -> str:
    """Lower-case, drop punctuation, collapse whitespace: ``"A red circle, top-left."`` ->
    ``"a red circle top left"``.

    Punctuation separates words (``top-left`` -> ``top left``) except an apostrophe inside a
    word, which is kept (``isn't``).  Underscores count as punctuation.  Idempotent.
    """
    s = str(s).lower()
    s = _WORD_APOSTROPHE.sub("\u0001", s)  # protect in-word apostrophes
    s = _NON_WORD.sub(" ", s.replace("_", " ")).replace("\u0001", "'")
    return " ".join(s.split())


def _as_hyp(value: Any, key: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and len(value) == 1 and isinstance(value[0], str):
        return value[0]
    raise ValueError(f"hypothesis for {key!r} must be a string or a one-element list, got {value!r}")


def _prepare(refs: Mapping, hyps: Mapping, tokenize: bool) -> list[tuple[list[list[str]], list[str]]]:
    """[(reference token lists, hypothesis tokens)] in ``refs`` key order."""
    if set(refs) != set(hyps):
        missing, extra = set(refs) - set(hyps), set(hyps) - set(refs)
        raise ValueError(f"refs and hyps must have the same ids (missing {missing}, extra {extra})")
    out = []
    for key in refs:
        rs = refs[key]
        if isinstance(rs, str):
            rs = [rs]
        if len(rs) == 0:
            raise ValueError(f"image {key!r} has no reference captions")
        h = _as_hyp(hyps[key], key)
        prep = tokenize_caption if tokenize else (lambda x: x)
        out.append(([prep(r).split() for r in rs], prep(h).split()))
    return out


def _ngram_counts(words: Sequence[str], n: int) -> Counter:
    counts: Counter = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i : i + k])] += 1
    return counts


_BLEU_TINY = 1e-15
_BLEU_SMALL = 1e-9


def _bleu_from_counts(correct, guess, testlen, reflen, n) -> list[float]:
    scores = []
    prod = 1.0
    for k in range(n):
        prod *= (float(correct[k]) + _BLEU_TINY) / (float(guess[k]) + _BLEU_SMALL)
        scores.append(prod ** (1.0 / (k + 1)))
    ratio = (testlen + _BLEU_TINY) / (reflen + _BLEU_SMALL)
    if ratio < 1:
        bp = math.exp(1 - 1 / ratio)
        scores = [s * bp for s in scores]
    return scores


def bleu(
    refs: Mapping[Any, Sequence[str]],
    hyps: Mapping[Any, Sequence[str] | str],
    n: int = 4,
    tokenize: bool = True,
) -> tuple[list[float], list[list[float]]]:
    """Corpus BLEU-1..n and per-image BLEU, equal to pycocoevalcap's ``Bleu(n).compute_score``.

    refs: image id -> reference captions; hyps: image id -> caption or ``[caption]``.
    Returns ``(bleus, per_image)``: ``bleus[k]`` is corpus BLEU-(k+1) (``bleus[-1]`` is
    BLEU-n); ``per_image[k][j]`` is BLEU-(k+1) of the j-th image in ``refs`` order.
    ``tokenize=False`` scores the strings as given (split on whitespace).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    items = _prepare(refs, hyps, tokenize)
    total_correct, total_guess = [0] * n, [0] * n
    total_test, total_ref = 0, 0
    per_image: list[list[float]] = [[] for _ in range(n)]
    for ref_words, hyp_words in items:
        maxcounts: dict = {}
        for r in ref_words:
            for g, c in _ngram_counts(r, n).items():
                if c > maxcounts.get(g, 0):
                    maxcounts[g] = c
        testlen = len(hyp_words)
        # "closest" reference length; ties go to the shorter reference.
        reflen = min((abs(len(r) - testlen), len(r)) for r in ref_words)[1]
        guess = [max(0, testlen - k) for k in range(n)]
        correct = [0] * n
        for g, c in _ngram_counts(hyp_words, n).items():
            correct[len(g) - 1] += min(maxcounts.get(g, 0), c)
        for k in range(n):
            total_correct[k] += correct[k]
            total_guess[k] += guess[k]
        total_test += testlen
        total_ref += reflen
        for k, s in enumerate(_bleu_from_counts(correct, guess, testlen, reflen, n)):
            per_image[k].append(s)
    bleus = _bleu_from_counts(total_correct, total_guess, total_test, total_ref, n)
    return bleus, per_image


def cider_d(
    refs: Mapping[Any, Sequence[str]],
    hyps: Mapping[Any, Sequence[str] | str],
    n: int = 4,
    sigma: float = 6.0,
    tokenize: bool = True,
) -> tuple[float, list[float]]:
    """CIDEr-D, equal to pycocoevalcap's ``Cider().compute_score``: ``(corpus, per_image)``.

    Document frequencies come from the references of exactly the images passed in, so scores
    depend on the evaluated set (one image alone always scores 0: idf = log 1 - log 1).
    """
    items = _prepare(refs, hyps, tokenize)
    ref_counts = [[_ngram_counts(r, n) for r in rs] for rs, _ in items]
    hyp_counts = [_ngram_counts(h, n) for _, h in items]
    df: Counter = Counter()
    for counts in ref_counts:
        df.update({g for c in counts for g in c})
    log_num_images = math.log(float(len(items))) if items else 0.0

    def vectorise(counts: Counter):
        vec: list[dict] = [{} for _ in range(n)]
        sq = [0.0] * n
        length = 0
        for g, tf in counts.items():
            k = len(g) - 1
            w = float(tf) * (log_num_images - math.log(max(1.0, float(df.get(g, 0)))))
            vec[k][g] = w
            sq[k] += w * w
            if k == 1:  # pycocoevalcap measures length in bigrams
                length += tf
        return vec, [math.sqrt(x) for x in sq], length

    penalty_scale = 2.0 * sigma**2
    scores: list[float] = []
    for hc, rcs in zip(hyp_counts, ref_counts):
        vh, nh, lh = vectorise(hc)
        total = [0.0] * n
        for rc in rcs:
            vr, nr, lr = vectorise(rc)
            penalty = math.exp(-(float(lh - lr) ** 2) / penalty_scale)
            for k in range(n):
                val = 0.0
                for g, w in vh[k].items():
                    wr = vr[k].get(g, 0.0)
                    val += min(w, wr) * wr
                if nh[k] != 0 and nr[k] != 0:
                    val /= nh[k] * nr[k]
                total[k] += val * penalty
        scores.append(sum(total) / n / len(rcs) * 10.0)  # pycocoevalcap's order of operations
    corpus = sum(scores) / len(scores) if scores else float("nan")
    return corpus, scores


def caption_scores(
    refs: Mapping[Any, Sequence[str]], hyps: Mapping[Any, Sequence[str] | str], tokenize: bool = True
) -> dict[str, float]:
    """``{"BLEU-1".."BLEU-4", "CIDEr-D"}`` for a corpus (corpus-level values)."""
    bleus, _ = bleu(refs, hyps, n=4, tokenize=tokenize)
    cider, _ = cider_d(refs, hyps, tokenize=tokenize)
    out = {f"BLEU-{k + 1}": b for k, b in enumerate(bleus)}
    out["CIDEr-D"] = cider
    return out


# =============================================================================================
# Shapes attribute accuracy
# =============================================================================================

ATTRIBUTES: tuple[str, ...] = ("color", "shape", "cell", "size")


def _attrs(obj: Any) -> dict[str, Any]:
    if isinstance(obj, Mapping):
        return {a: obj.get(a) for a in ATTRIBUTES}
    return {a: getattr(obj, a, None) for a in ATTRIBUTES}


def _agree(p: Mapping, g: Mapping, attr: str) -> bool:
    return p[attr] is not None and p[attr] == g[attr]


def _best_pairs(preds: list[dict], gts: list[dict]) -> list[tuple[int, int]]:
    """(pred index, gt index) pairs maximising the total number of agreeing attributes."""
    if not preds or not gts:
        return []
    from scipy.optimize import linear_sum_assignment

    agree = [[sum(_agree(p, g, a) for a in ATTRIBUTES) for g in gts] for p in preds]
    rows, cols = linear_sum_assignment(agree, maximize=True)
    return [(int(r), int(c)) for r, c in zip(rows, cols)]


def _parse_caption_safe(text: str) -> tuple[list[dict], bool]:
    from mmdiff.world.text import parse_caption

    try:
        objs = parse_caption(text)
    except ValueError:
        return [], False
    return [_attrs(o) for o in (objs or [])], bool(objs)


def _attribute_counts(pred_caption: str, gt_objects: Sequence[Any]) -> dict:
    preds, parsed = _parse_caption_safe(pred_caption)
    gts = [_attrs(g) for g in gt_objects]
    pairs = _best_pairs(preds, gts)
    correct = {a: 0 for a in ATTRIBUTES}
    exact = 0
    for pi, gi in pairs:
        ok = [_agree(preds[pi], gts[gi], a) for a in ATTRIBUTES]
        for a, o in zip(ATTRIBUTES, ok):
            correct[a] += int(o)
        exact += int(all(ok))
    return {
        "correct": correct,
        "exact": exact,
        "slots": max(len(gts), len(preds)),
        "num_gt": len(gts),
        "num_pred": len(preds),
        "parsed": parsed,
    }


def _attribute_summary(correct: Mapping[str, int], exact: int, slots: int) -> dict[str, float]:
    if slots == 0:
        out = {a: 1.0 for a in ATTRIBUTES}
        out.update(overall=1.0, object=1.0)
        return out
    out = {a: correct[a] / slots for a in ATTRIBUTES}
    out["overall"] = sum(correct.values()) / (len(ATTRIBUTES) * slots)
    out["object"] = exact / slots
    return out


def caption_attribute_accuracy(pred_caption: str, gt_objects: Sequence[Any]) -> dict:
    """Attribute accuracy of a predicted caption against the scene's objects.

    gt_objects: dicts or objects with ``shape, color, size, cell`` (e.g. ``SceneObject``).
    Returns ``{color, shape, cell, size, overall, object}`` accuracies (definition in the
    module docstring) plus ``num_gt``, ``num_pred`` and ``parsed`` (False when the caption
    could not be read).
    """
    c = _attribute_counts(pred_caption, gt_objects)
    out: dict[str, Any] = _attribute_summary(c["correct"], c["exact"], c["slots"])
    out.update(num_gt=c["num_gt"], num_pred=c["num_pred"], parsed=c["parsed"])
    return out


def caption_attribute_scores(
    pred_captions: Sequence[str], gt_objects: Sequence[Sequence[Any]]
) -> dict:
    """Micro average over a corpus: counts summed over captions, then divided once.

    Also reports ``parse_rate`` (fraction of captions that parsed) and ``count``.
    """
    if len(pred_captions) != len(gt_objects):
        raise ValueError(f"{len(pred_captions)} captions but {len(gt_objects)} ground truths")
    correct = {a: 0 for a in ATTRIBUTES}
    exact = slots = parsed = 0
    for pred, gts in zip(pred_captions, gt_objects):
        c = _attribute_counts(pred, gts)
        for a in ATTRIBUTES:
            correct[a] += c["correct"][a]
        exact += c["exact"]
        slots += c["slots"]
        parsed += int(c["parsed"])
    out: dict[str, Any] = _attribute_summary(correct, exact, slots)
    n = len(pred_captions)
    out.update(parse_rate=parsed / n if n else float("nan"), count=n)
    return out


# =============================================================================================
# Description precision / recall / F1
# =============================================================================================


def _alternation(words: Iterable[str]) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_NUMBER = "|".join([r"\d+"] + list(COUNT_WORDS) + ["ten"])
_HEAD_RE = re.compile(rf"^there\s+(?:is|are)\s+({_NUMBER})\s+(?:shape|shapes|object|objects)$")
_OBJECT_RE = re.compile(
    rf"^(?:(?:a|an|one)\s+)?(?:({_alternation(SIZES)})\s+)?({_alternation(COLORS)})\s+"
    rf"({_alternation(SHAPES)})\s+(?:at|in)\s+the\s+({_alternation(CELLS)})$"
)


def parse_description(text: str) -> dict:
    """Parse a long description into ``{"objects", "count", "unparsed"}``.

    ``objects``: ``[{shape, color, size, cell}]`` in order (``size`` None when not named);
    ``count``: the number stated by the ``there is/are N shape(s)`` sentence (None if absent);
    ``unparsed``: the non-empty sentences that are neither a head nor an object.
    """
    objects: list[dict] = []
    unparsed: list[str] = []
    count: int | None = None
    for sentence in str(text).lower().split("."):
        s = " ".join(sentence.replace(",", " ").split())
        if not s:
            continue
        head = _HEAD_RE.match(s)
        if head is not None and count is None:
            word = head.group(1)
            count = int(word) if word.isdigit() else (10 if word == "ten" else COUNT_WORDS.index(word))
            continue
        m = _OBJECT_RE.match(s)
        if m is None:
            unparsed.append(s)
            continue
        size, color, shape, cell = m.groups()
        objects.append({"shape": shape, "color": color, "size": size, "cell": cell})
    return {"objects": objects, "count": count, "unparsed": unparsed}


def _key(obj: Any) -> tuple:
    a = _attrs(obj)
    return (a["shape"], a["color"], a["size"], a["cell"])


def _prf(tp: int, num_pred: int, num_gt: int) -> tuple[float, float, float]:
    precision = tp / num_pred if num_pred else float(num_gt == 0)
    recall = tp / num_gt if num_gt else float(num_pred == 0)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return precision, recall, f1


def _describe_counts(pred_description: str, gt_objects: Sequence[Any]) -> dict:
    parsed = parse_description(pred_description)
    pred_keys = Counter(_key(o) for o in parsed["objects"])
    gt_keys = Counter(_key(o) for o in gt_objects)
    tp = sum((pred_keys & gt_keys).values())
    num_pred = len(parsed["objects"]) + len(parsed["unparsed"])
    num_gt = len(gt_objects)
    return {
        "tp": tp,
        "fp": num_pred - tp,
        "fn": num_gt - tp,
        "num_pred": num_pred,
        "num_gt": num_gt,
        "count": parsed["count"],
        "unparsed": len(parsed["unparsed"]),
    }


def describe_prf(pred_description: str, gt_objects: Sequence[Any]) -> dict:
    """Object-level precision / recall / F1 of a long description (module docstring).

    Returns ``{precision, recall, f1, tp, fp, fn, num_pred, num_gt, unparsed, count_correct}``;
    ``count_correct`` says whether the stated ``there are N shapes`` equals the number of
    ground-truth objects (False when no count is stated).
    """
    c = _describe_counts(pred_description, gt_objects)
    p, r, f = _prf(c["tp"], c["num_pred"], c["num_gt"])
    return {
        "precision": p,
        "recall": r,
        "f1": f,
        "tp": c["tp"],
        "fp": c["fp"],
        "fn": c["fn"],
        "num_pred": c["num_pred"],
        "num_gt": c["num_gt"],
        "unparsed": c["unparsed"],
        "count_correct": c["count"] == c["num_gt"],
    }


def describe_prf_corpus(
    pred_descriptions: Sequence[str], gt_objects: Sequence[Sequence[Any]]
) -> dict:
    """Micro-averaged P/R/F1 (TP, FP, FN summed over the corpus) plus ``count_accuracy``."""
    if len(pred_descriptions) != len(gt_objects):
        raise ValueError(f"{len(pred_descriptions)} descriptions but {len(gt_objects)} ground truths")
    tp = num_pred = num_gt = counts_ok = 0
    for pred, gts in zip(pred_descriptions, gt_objects):
        c = _describe_counts(pred, gts)
        tp += c["tp"]
        num_pred += c["num_pred"]
        num_gt += c["num_gt"]
        counts_ok += int(c["count"] == c["num_gt"])
    p, r, f = _prf(tp, num_pred, num_gt)
    n = len(pred_descriptions)
    return {
        "precision": p,
        "recall": r,
        "f1": f,
        "tp": tp,
        "fp": num_pred - tp,
        "fn": num_gt - tp,
        "count_accuracy": counts_ok / n if n else float("nan"),
        "count": n,
    }
