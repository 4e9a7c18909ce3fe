"""The text tokenizer: a real Hugging Face byte-level BPE, trained offline, plus special tokens.

Design notes
------------
* **Same interface as a real LLaDA tokenizer.**  ``train_text_tokenizer`` trains a
  ``tokenizers`` BPE model and wraps it in ``PreTrainedTokenizerFast``; the directory it writes
  (``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``) loads with
  ``AutoTokenizer.from_pretrained(dir)`` and ``PreTrainedTokenizerFast.from_pretrained(dir)``
  without any network access.  ``mask_token``, ``pad_token``, ``eos_token`` and ``bos_token`` are
  set; the remaining specials (image start/end/placeholder, user, assistant) are registered as
  extra ("additional") special tokens.  Swapping in a pretrained LLaDA/Qwen tokenizer later means
  pointing ``load_text_tokenizer`` at its directory with a ``SpecialTokens`` naming its strings.
* **No id is hard-coded.**  ``SpecialTokens`` holds the token *strings*; ``special_ids`` looks the
  ids up in whatever tokenizer is loaded.  ``load_text_tokenizer`` checks that every configured
  special token exists and is a single id (errors name the token and the directory).
* **Byte-level** pre-tokenisation (GPT-2 style, no prefix space) means every Unicode string
  encodes without an unknown token and ``decode(encode(s)) == s`` exactly.
* **Vocabulary size.**  The Shapes world uses ~60 distinct words (colours, shapes, sizes, cell
  names, question words, numbers).  The byte alphabet (256) plus 9 specials leaves ~250 merges in
  a 512 vocabulary, enough for every world word - with and without its leading-space marker - to
  become a single token, which keeps sequences short on CPU.  ``vocab_size`` is an upper bound:
  on a small corpus BPE stops when no pair occurs ``min_frequency`` times, so the trained
  vocabulary can be smaller (``len(tokenizer)`` is the truth).  Real data wants 32k+.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterable

__all__ = [
    "SpecialTokens",
    "DEFAULT_VOCAB_SIZE",
    "train_text_tokenizer",
    "load_text_tokenizer",
    "special_ids",
    "MissingSpecialTokenError",
    "record_texts",
    "shard_texts",
]

DEFAULT_VOCAB_SIZE = 512

#: SpecialTokens fields that map to the standard Hugging Face attribute of the same role.
_HF_ROLES = {"mask": "mask_token", "pad": "pad_token", "eos": "eos_token", "bos": "bos_token"}


class MissingSpecialTokenError(ValueError):
    """A configured special token is absent from the tokenizer (or is not one single id)."""


@dataclass
class SpecialTokens:
    """The special-token *strings* (config).  Ids are looked up from the tokenizer at run time."""

    mask: str = "<|mask|>"
    pad: str = "<|pad|>"
    eos: str = "<|eos|>"
    bos: str = "<|bos|>"
    image_start: str = "<|image_start|>"
    image_end: str = "<|image_end|>"
    image: str = "<|image|>"  # placeholder for one projected vision feature / one VQ code slot
    user: str = "<|user|>"
    assistant: str = "<|assistant|>"

    def validate(self) -> None:
        seen: dict[str, str] = {}
        for name, tok in self.as_dict().items():
            if not isinstance(tok, str) or not tok or tok != tok.strip():
                raise ValueError(f"special token '{name}' must be a non-empty string without "
                                 f"surrounding whitespace, got {tok!r}")
            if tok in seen:
                raise ValueError(f"special tokens '{seen[tok]}' and '{name}' are both {tok!r}; "
                                 "each role needs its own token")
            seen[tok] = name

    def as_dict(self) -> dict[str, str]:
        """``{role: token string}`` in field order."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def extra(self) -> list[str]:
        """The tokens that have no standard Hugging Face attribute (image/role markers)."""
        return [tok for name, tok in self.as_dict().items() if name not in _HF_ROLES]


def _build_bpe(texts: Iterable[str], vocab_size: int, special: SpecialTokens, min_frequency: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = list(special.as_dict().values())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,  # ids 0..len-1, in SpecialTokens field order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((t for t in texts if t), trainer=trainer)
    return tok


def train_text_tokenizer(
    texts: Iterable[str],
    out_dir: str | Path,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    special: SpecialTokens | None = None,
    model: str = "bpe",
    min_frequency: int = 2,
):
    """Train a byte-level BPE on ``texts`` and save it to ``out_dir``; return the loaded tokenizer.

    The result is a ``PreTrainedTokenizerFast`` (``TokenizersBackend`` in transformers 5) whose
    directory reloads with ``AutoTokenizer.from_pretrained(out_dir)``.
    """
    from transformers import PreTrainedTokenizerFast

    special = special or SpecialTokens()
    special.validate()
    if model != "bpe":
        raise ValueError(f"unsupported tokenizer model {model!r}; only 'bpe' (byte-level) is implemented")
    n_special = len(special.as_dict())
    if vocab_size < 256 + n_special:
        raise ValueError(f"vocab_size={vocab_size} is too small: byte-level BPE needs at least "
                         f"256 byte tokens + {n_special} special tokens = {256 + n_special}")
    texts = list(texts)
    if not any(texts):
        raise ValueError("train_text_tokenizer: no (non-empty) training texts were given")

    raw = _build_bpe(texts, vocab_size, special, min_frequency)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        **{hf: getattr(special, name) for name, hf in _HF_ROLES.items()},
        extra_special_tokens=special.extra(),
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out))

    # Portable config: transformers 4.x reads "additional_special_tokens" and needs a class name
    # it knows; transformers 5 reads "extra_special_tokens".  Write both, plus the classic
    # special_tokens_map.json (transformers 5 no longer writes it).
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["extra_special_tokens"] = special.extra()
    cfg["additional_special_tokens"] = special.extra()
    cfg["mmdiff_special_tokens"] = special.as_dict()
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    smap = {hf: getattr(special, name) for name, hf in _HF_ROLES.items()}
    smap["additional_special_tokens"] = special.extra()
    (out / "special_tokens_map.json").write_text(json.dumps(smap, indent=2, ensure_ascii=False) + "\n")
    return load_text_tokenizer(out, special)


def _lookup(tokenizer, token: str) -> int | None:
    """The single id of ``token`` in ``tokenizer`` or None when it is missing / not atomic."""
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or not isinstance(tid, int):
        return None
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and tid == unk and token != getattr(tokenizer, "unk_token", None):
        return None
    if tokenizer.encode(token, add_special_tokens=False) != [tid]:
        return None  # present in the vocab but split when it appears in text: not special
    return tid


def special_ids(tokenizer, special: SpecialTokens | None = None) -> dict[str, int]:
    """``{role: id}`` for every role of ``special`` (e.g. ``{"mask": 3, ...}``).

    Raises ``MissingSpecialTokenError`` naming every missing token.
    """
    special = special or SpecialTokens()
    ids: dict[str, int] = {}
    missing: list[str] = []
    for name, token in special.as_dict().items():
        tid = _lookup(tokenizer, token)
        if tid is None:
            missing.append(f"{name}={token!r}")
        else:
            ids[name] = tid
    if missing:
        where = getattr(tokenizer, "name_or_path", "") or "<in-memory tokenizer>"
        raise MissingSpecialTokenError(
            f"tokenizer at {where} lacks special token(s) {', '.join(missing)} (each must exist "
            "and encode to exactly one id); configure SpecialTokens with this tokenizer's strings "
            "or load it with load_text_tokenizer(..., add_missing=True)"
        )
    dup: dict[int, str] = {}
    for name, tid in ids.items():
        if tid in dup:
            raise MissingSpecialTokenError(
                f"special tokens '{dup[tid]}' and '{name}' map to the same id {tid}")
        dup[tid] = name
    return ids


def load_text_tokenizer(path: str | Path, special: SpecialTokens | None = None,
                        add_missing: bool = False):
    """Load a tokenizer directory offline and verify the configured special tokens.

    Works for directories written by ``train_text_tokenizer`` and for real LLaDA/Qwen tokenizer
    directories.  ``add_missing=True`` registers absent specials as new special tokens (the
    model's embedding table must then grow to ``len(tokenizer)``); otherwise a missing token is
    a ``MissingSpecialTokenError`` naming it and ``path``.
    """
    from transformers import AutoTokenizer

    special = special or SpecialTokens()
    special.validate()
    path = Path(path)
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"no tokenizer found at {path} (expected tokenizer.json / "
                                "tokenizer_config.json); train one with tokenizers/train_text_tokenizer.py")
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    absent = [t for t in special.as_dict().values() if _lookup(tok, t) is None]
    if absent and add_missing:
        tok.add_tokens(absent, special_tokens=True)
    tok.name_or_path = str(path)  # so errors from special_ids name the directory
    special_ids(tok, special)
    return tok


# ------------------------------------------------------------------ training texts from shards
def record_texts(record: dict) -> list[str]:
    """All texts of one sample's JSON record: captions, description, qa, text, conversations."""
    out: list[str] = []

    def add(x) -> None:
        if isinstance(x, str) and x.strip():
            out.append(x.replace("<image>", " ").strip())

    add(record.get("caption"))
    for c in record.get("captions") or []:
        if c != record.get("caption"):
            add(c)
    add(record.get("description"))
    add(record.get("text"))
    for qa in record.get("qa") or []:
        if isinstance(qa, dict):
            add(qa.get("question"))
            add(qa.get("answer"))
    for turn in record.get("conversations") or []:
        if isinstance(turn, dict):
            add(turn.get("value", turn.get("content")))
    return out


def shard_texts(paths) -> Iterable[str]:
    """Texts of every sample in the shards under ``paths`` (dirs / tars), read without images.

    Uses the ``.json`` record; a sample with only a ``.txt`` contributes that text.  Unreadable
    records are skipped (the tokenizer only needs text statistics).
    """
    import tarfile

    from mmdiff.data.shards import list_shards

    for shard in list_shards(paths):
        pending: dict[str, dict[str, bytes]] = {}
        with tarfile.open(shard, "r|*") as tar:
            for m in tar:
                if not m.isreg() or "." not in m.name:
                    continue
                key, ext = m.name.split(".", 1)
                if ext.lower() in ("json", "txt"):
                    f = tar.extractfile(m)
                    if f is not None:
                        pending.setdefault(key, {})[ext.lower()] = f.read()
        for key in sorted(pending):
            files = pending[key]
            texts: list[str] = []
            if "json" in files:
                try:
                    rec = json.loads(files["json"].decode("utf-8"))
                    texts = record_texts(rec) if isinstance(rec, dict) else []
                except (UnicodeDecodeError, json.JSONDecodeError):
                    texts = []
            if not texts and "txt" in files:
                try:
                    texts = [t for t in [files["txt"].decode("utf-8").strip()] if t]
                except UnicodeDecodeError:
                    texts = []
            yield from texts


def train_tokenizer_from_shards(paths, out_dir: str | Path, vocab_size: int = 512,
                                special: SpecialTokens | None = None, min_frequency: int = 2) -> dict:
    """Train the tokenizer on every text of the shards under ``paths``; a summary dict."""
    tok = train_text_tokenizer(shard_texts(paths), out_dir, vocab_size=vocab_size, special=special,
                               min_frequency=min_frequency)
    return {"out_dir": str(out_dir), "vocab_size": len(tok),
            "special_ids": special_ids(tok, special or SpecialTokens())}
