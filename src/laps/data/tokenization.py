"""The caption tokenizer: BERT word splitting, WordPiece, and the official size augmentation.

The augmentation is the LAPS / VSE infinity recipe (``process_caption`` of the official code): each
*word* of the BERT basic tokenizer, with probability ``augment_prob`` (0.2), is changed; given a change,
with probability 0.5 all its word pieces become ``[MASK]``, 0.1 each piece becomes a random vocabulary
token, 0.4 the word is deleted. One ``rng.random()`` draw is made per word, changed or not.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

from laps.models.backbones import TEXT_ENCODER

__all__ = ["CaptionTokenizer", "TokenizerUnavailableError", "load_bert_tokenizer"]

log = logging.getLogger(__name__)

MASK_PROB = 0.5  # of a changed word: all pieces -> [MASK]
REPLACE_PROB = 0.1  # of a changed word: each piece -> a random vocabulary token
# the remaining 0.4: the word is deleted


class TokenizerUnavailableError(RuntimeError):
    """The tokenizer vocabulary could not be found locally or downloaded."""


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~", "\\")) or name.endswith(".txt") or Path(name).exists()


def load_bert_tokenizer(name_or_path: str | Path, option: str = "dataset.tokenizer") -> Any:
    """A ``transformers.BertTokenizer`` from a hub name, a local folder (or its ``vocab.txt``), or the cache.

    Raises:
        TokenizerUnavailableError: naming ``name_or_path`` and the config option ``option`` to change.
    """
    from transformers import BertTokenizer

    name = str(name_or_path)
    if _looks_like_path(name):
        path = Path(name).expanduser()
        folder = path.parent if path.is_file() else path
        if not folder.is_dir() or not any((folder / f).is_file() for f in ("vocab.txt", "tokenizer.json")):
            raise TokenizerUnavailableError(
                f"Tokenizer folder {str(path)!r} does not exist or holds no vocab.txt / tokenizer.json. "
                f"Set {option}=<a folder with vocab.txt> or a hub name such as {TEXT_ENCODER}."
            )
        try:
            tokenizer = BertTokenizer.from_pretrained(str(folder))
        except Exception as err:  # re-raised with the path
            raise TokenizerUnavailableError(
                f"Cannot load a BERT tokenizer from {str(folder)!r} ({type(err).__name__}: {err}). "
                f"Check the files there or set {option}=..."
            ) from err
        return _checked(tokenizer, str(folder), option)
    cached = _cached_vocab(name)
    if cached is not None:  # no network needed
        return _checked(BertTokenizer.from_pretrained(str(cached.parent)), name, option)
    from huggingface_hub import constants, hf_hub_download

    cause: BaseException | None = None
    if not constants.HF_HUB_OFFLINE:
        try:
            hf_hub_download(name, "vocab.txt")  # one file first: fails fast(er) when offline
            return _checked(BertTokenizer.from_pretrained(name), name, option)
        except TokenizerUnavailableError:
            raise
        except Exception as err:  # noqa: BLE001 - OSError offline, HTTP errors, ...
            cause = err
    why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "it could not be downloaded"
    raise TokenizerUnavailableError(
        f"Cannot load the tokenizer {name!r}: it is not in the local Hugging Face cache and {why}"
        f"{f' ({type(cause).__name__})' if cause else ''}. Download it elsewhere (e.g. "
        f"`hf download {name} vocab.txt tokenizer_config.json --local-dir DIR`) and set "
        f"{option}=DIR (a folder holding vocab.txt), or fill HF_HOME's cache on a machine with network."
    ) from cause


def _cached_vocab(name: str) -> Path | None:
    """``vocab.txt`` of hub repo ``name`` in the local Hugging Face cache, if there."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, "vocab.txt")
    except Exception:  # noqa: BLE001 - an invalid repo id, ...
        return None
    return Path(found) if isinstance(found, str) else None


def _checked(tokenizer: Any, name: str, option: str) -> Any:
    """Reject the vocabulary-less tokenizer that transformers builds when it finds no vocabulary file."""
    if len(tokenizer) <= len(set(tokenizer.all_special_tokens)):
        raise TokenizerUnavailableError(
            f"The tokenizer loaded from {name!r} has no vocabulary (only {len(tokenizer)} special tokens); "
            f"set {option}=<a folder holding vocab.txt> or a hub name such as {TEXT_ENCODER}."
        )
    return tokenizer


class CaptionTokenizer:
    """Caption -> token ids ``[CLS] pieces... [SEP]`` with at most ``max_words`` pieces between them.

    Args:
        name_or_path: hub name (:data:`laps.models.backbones.TEXT_ENCODER`), local folder holding ``vocab.txt``, or that file.
        max_words: word pieces kept per caption, ``[CLS]``/``[SEP]`` excluded; longer captions are
            truncated (counted in ``num_truncated``), never an error.
        augment_prob: probability that a word is changed by the size augmentation.
        option: config key named in errors.

    Counters (of this process; DataLoader workers count their own): ``num_captions``, ``num_truncated``,
    ``max_pieces_seen``; ``summary()`` reports them.
    """

    def __init__(
        self,
        name_or_path: str | Path,
        max_words: int = 90,
        augment_prob: float = 0.2,
        option: str = "dataset.tokenizer",
    ) -> None:
        if int(max_words) < 1:
            raise ValueError(f"max_words must be >= 1, got {max_words!r}")
        if not 0.0 <= float(augment_prob) <= 1.0:
            raise ValueError(f"augment_prob must be in [0, 1], got {augment_prob!r}")
        self.name_or_path = str(name_or_path)
        self.max_words = int(max_words)
        self.augment_prob = float(augment_prob)
        self.tokenizer = load_bert_tokenizer(name_or_path, option=option)
        self._backend = self.tokenizer.backend_tokenizer
        ids = {}
        for role in ("pad", "cls", "sep", "mask"):
            token_id = getattr(self.tokenizer, f"{role}_token_id", None)
            if token_id is None:
                raise TokenizerUnavailableError(
                    f"Tokenizer {self.name_or_path!r} has no {role} token ([{role.upper()}] missing from its "
                    f"vocabulary); set {option}=... to a BERT vocabulary."
                )
            ids[role] = int(token_id)
        self._pad_id, self._cls_id = ids["pad"], ids["cls"]
        self._sep_id, self._mask_id = ids["sep"], ids["mask"]
        self._vocab_size = len(self.tokenizer)
        self.num_captions = 0
        self.num_truncated = 0
        self.max_pieces_seen = 0

    # ------------------------------------------------------------------ properties
    @property
    def pad_id(self) -> int:
        """Id of ``[PAD]`` (what collate functions pad ``input_ids`` with)."""
        return self._pad_id

    @property
    def cls_id(self) -> int:
        return self._cls_id

    @property
    def sep_id(self) -> int:
        return self._sep_id

    @property
    def mask_id(self) -> int:
        return self._mask_id

    @property
    def vocab_size(self) -> int:
        """Number of ids (random replacements are drawn uniformly from ``range(vocab_size)``)."""
        return self._vocab_size

    # ------------------------------------------------------------------ tokenizing
    def word_pieces(self, caption: str) -> list[list[int]]:
        """The WordPiece ids of each BERT basic-tokenizer word of ``caption`` (no special tokens)."""
        enc = self._backend.encode(caption, add_special_tokens=False)
        words: list[list[int]] = []
        last: int | None = None
        for piece, word in zip(enc.ids, enc.word_ids):
            if word is None or word != last or not words:
                words.append([piece])
                last = word
            else:
                words[-1].append(piece)
        return words

    def __call__(self, caption: str, augment: bool = False, rng: random.Random | None = None) -> list[int]:
        """Token ids ``[CLS] p_1 ... p_n [SEP]`` with ``n <= max_words``; ``augment``: size augmentation.

        ``rng`` (a ``random.Random``) makes the augmentation reproducible; default: the ``random`` module.
        """
        words = self.word_pieces(caption)
        pieces: list[int] = []
        if augment and self.augment_prob > 0:
            draw = rng if rng is not None else random
            p_change = self.augment_prob
            for word in words:
                p = draw.random()
                if p < p_change:
                    p /= p_change
                    if p < MASK_PROB:
                        pieces.extend([self._mask_id] * len(word))
                    elif p < MASK_PROB + REPLACE_PROB:
                        pieces.extend(draw.randrange(self._vocab_size) for _ in word)
                    # else: deleted
                else:
                    pieces.extend(word)
        else:
            for word in words:
                pieces.extend(word)
        self.num_captions += 1
        self.max_pieces_seen = max(self.max_pieces_seen, len(pieces))
        if len(pieces) > self.max_words:
            if self.num_truncated == 0:
                log.info(
                    "A caption of %d word pieces was truncated to max_words=%d (further truncations are "
                    "counted; see CaptionTokenizer.summary()): %.80r",
                    len(pieces), self.max_words, caption,
                )
            self.num_truncated += 1
            pieces = pieces[: self.max_words]
        return [self._cls_id, *pieces, self._sep_id]

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        """Ids -> token strings (for inspection)."""
        return list(self.tokenizer.convert_ids_to_tokens(list(ids)))

    # ------------------------------------------------------------------ counters
    def reset_counters(self) -> None:
        self.num_captions = 0
        self.num_truncated = 0
        self.max_pieces_seen = 0

    def summary(self) -> str:
        """One line: captions tokenized, truncated to ``max_words``, longest seen (in this process)."""
        frac = self.num_truncated / self.num_captions if self.num_captions else 0.0
        return (
            f"{self.num_captions} captions tokenized, {self.num_truncated} ({frac:.2%}) truncated to "
            f"max_words={self.max_words}, longest {self.max_pieces_seen} word pieces"
        )

    def __repr__(self) -> str:
        return (
            f"CaptionTokenizer({self.name_or_path!r}, max_words={self.max_words}, "
            f"augment_prob={self.augment_prob}, vocab_size={self.vocab_size})"
        )
