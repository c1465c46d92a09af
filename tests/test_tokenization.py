"""CaptionTokenizer: word splitting, truncation, the size augmentation's statistics, errors."""

from __future__ import annotations

import os
import pickle
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from laps.data.tokenization import CaptionTokenizer, TokenizerUnavailableError

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["a", "man", "with", "glasses", "is", "wear", "##ing", "an", "orange", "hat", ".", ",", "cat", "dog"]
FILLER = [f"tok{i}" for i in range(2000)]  # a large vocabulary: random replacements rarely hit a real word


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("vocab")
    (d / "vocab.txt").write_text("\n".join(SPECIAL + WORDS + FILLER) + "\n", encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def tok(vocab_dir: Path) -> CaptionTokenizer:
    return CaptionTokenizer(vocab_dir, max_words=90)


def test_word_split_and_special_tokens(tok: CaptionTokenizer) -> None:
    ids = tok("A Man is WEARING glasses, zzz.")
    assert tok.convert_ids_to_tokens(ids) == [
        "[CLS]", "a", "man", "is", "wear", "##ing", "glasses", ",", "[UNK]", ".", "[SEP]"
    ]
    assert tok.word_pieces("wearing glasses") == [[tok.tokenizer.convert_tokens_to_ids("wear"),
                                                  tok.tokenizer.convert_tokens_to_ids("##ing")],
                                                 [tok.tokenizer.convert_tokens_to_ids("glasses")]]
    assert tok.pad_id == 0 and tok.cls_id == 2 and tok.sep_id == 3 and tok.mask_id == 4
    assert tok.vocab_size == len(SPECIAL) + len(WORDS) + len(FILLER)
    assert tok("") == [tok.cls_id, tok.sep_id]


def test_vocab_file_path_and_pickle(vocab_dir: Path) -> None:
    t = CaptionTokenizer(vocab_dir / "vocab.txt", max_words=4)
    t2 = pickle.loads(pickle.dumps(t))  # DataLoader workers
    assert t2("a man with glasses") == t("a man with glasses")


def test_truncation_counted_not_error(vocab_dir: Path) -> None:
    t = CaptionTokenizer(vocab_dir, max_words=3)
    ids = t("a man is wearing glasses")  # 6 pieces
    assert len(ids) == 3 + 2 and ids[0] == t.cls_id and ids[-1] == t.sep_id
    assert t.convert_ids_to_tokens(ids)[1:-1] == ["a", "man", "is"]
    t("a man")
    assert (t.num_captions, t.num_truncated, t.max_pieces_seen) == (2, 1, 6)
    assert "1 (50.00%) truncated to max_words=3" in t.summary()
    t.reset_counters()
    assert t.num_truncated == 0


def test_no_augmentation_when_off(tok: CaptionTokenizer) -> None:
    caption = "a man with glasses is wearing an orange hat ."
    base = tok(caption)
    rng = random.Random(0)
    assert all(tok(caption, augment=False, rng=rng) == base for _ in range(200))


def test_augmentation_deterministic_given_seed(tok: CaptionTokenizer) -> None:
    caption = " ".join(["cat"] * 60)
    a = [tok(caption, augment=True, rng=random.Random(7)) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    b = tok(caption, augment=True, rng=random.Random(8))
    assert b != a[0]
    seq1, seq2 = random.Random(3), random.Random(3)
    assert [tok(caption, True, seq1) for _ in range(5)] == [tok(caption, True, seq2) for _ in range(5)]


def test_augmentation_statistics(tok: CaptionTokenizer) -> None:
    """Per word: kept 0.8, all pieces [MASK] 0.1, random tokens 0.02, deleted 0.08."""
    cat = tok.tokenizer.convert_tokens_to_ids("cat")
    n_words, n_caps = 50, 400
    caption = " ".join(["cat"] * n_words)
    rng = random.Random(1234)
    counts: Counter[str] = Counter()
    for _ in range(n_caps):
        ids = tok(caption, augment=True, rng=rng)
        pieces = ids[1:-1]
        assert ids[0] == tok.cls_id and ids[-1] == tok.sep_id
        counts["deleted"] += n_words - len(pieces)
        for p in pieces:
            counts["kept" if p == cat else "masked" if p == tok.mask_id else "replaced"] += 1
    total = n_words * n_caps
    frac = {k: v / total for k, v in counts.items()}
    assert frac["kept"] == pytest.approx(0.8, abs=0.015)
    assert frac["masked"] == pytest.approx(0.1, abs=0.012)
    assert frac["deleted"] == pytest.approx(0.08, abs=0.012)
    assert frac["replaced"] == pytest.approx(0.02, abs=0.006)


def test_augmentation_is_per_word(tok: CaptionTokenizer) -> None:
    """A two-piece word is masked, replaced or deleted as a whole."""
    wear, ing = (tok.tokenizer.convert_tokens_to_ids(t) for t in ("wear", "##ing"))
    rng = random.Random(5)
    kinds: Counter[str] = Counter()
    for _ in range(300):
        pieces = tok(" ".join(["wearing"] * 20), augment=True, rng=rng)[1:-1]
        assert len(pieces) % 2 == 0
        for a, b in zip(pieces[::2], pieces[1::2]):
            if (a, b) == (wear, ing):
                kinds["kept"] += 1
            elif a == b == tok.mask_id:
                kinds["masked"] += 1
            else:
                assert tok.mask_id not in (a, b) and (a, b) != (wear, ing)
                kinds["replaced"] += 1
    assert kinds["masked"] > 0 and kinds["replaced"] > 0


def test_errors_name_path_and_option(tmp_path: Path) -> None:
    with pytest.raises(TokenizerUnavailableError, match=r"no-such-folder.*dataset\.tokenizer"):
        CaptionTokenizer(tmp_path / "no-such-folder")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerUnavailableError, match="vocab.txt"):
        CaptionTokenizer(tmp_path / "empty")
    with pytest.raises(ValueError, match="max_words"):
        CaptionTokenizer(tmp_path, max_words=0)


def test_hub_name_offline_error_and_cache(tmp_path: Path, vocab_dir: Path) -> None:
    """Offline: an uncached hub name gives a clear error; a cached one loads without network."""
    snapshot = tmp_path / "hub" / "models--laps-test-org--cached-bert" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "vocab.txt").write_bytes((vocab_dir / "vocab.txt").read_bytes())
    (tmp_path / "hub" / "models--laps-test-org--cached-bert" / "refs").mkdir()
    (tmp_path / "hub" / "models--laps-test-org--cached-bert" / "refs" / "main").write_text("abc123")
    code = (
        "from laps.data.tokenization import CaptionTokenizer, TokenizerUnavailableError\n"
        "try:\n    CaptionTokenizer('laps-test-org/no-such-tokenizer')\n"
        "except TokenizerUnavailableError as e:\n    print('ERR', e)\n"
        "t = CaptionTokenizer('laps-test-org/cached-bert')\n"
        "print('CACHED', t.convert_ids_to_tokens(t('a man')))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env["HF_HUB_CACHE"] = str(tmp_path / "hub")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert "ERR" in out.stdout, out.stderr[-2000:]
    assert "laps-test-org/no-such-tokenizer" in out.stdout and "dataset.tokenizer" in out.stdout
    assert "CACHED ['[CLS]', 'a', 'man', '[SEP]']" in out.stdout, out.stderr[-2000:]
