"""A checkpoint written before the house restructuring (``tests/fixtures/checkpoint_v0``: the demo
recipe at width 32, one epoch, by commit 86ddcc9) still loads and scores as it did then."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from laps.compat.serialization import safe_load
from laps.inference import load_for_inference

FIXTURE = Path(__file__).parent / "fixtures" / "checkpoint_v0"


def test_fixture_is_from_before_the_factory() -> None:
    stored = safe_load(FIXTURE / "tiny.ckpt")["laps_config"]
    assert stored["model"]["net"]["_target_"] == "laps.models.LAPSModel"  # the old target path


def test_legacy_checkpoint_scores_as_recorded() -> None:
    expected = json.loads((FIXTURE / "expected.json").read_text())
    loaded = load_for_inference(FIXTURE / "tiny.ckpt", device="cpu")
    gen = torch.Generator().manual_seed(expected["seed"])
    images = torch.randn(*expected["images"], generator=gen)
    vocab = int(loaded.model.text.backbone.config.vocab_size)
    assert vocab == expected["vocab"]
    ids = torch.randint(5, vocab, tuple(expected["ids"]), generator=gen)
    lens = torch.tensor(expected["lengths"])
    with torch.no_grad():
        model = loaded.model
        sims = model.similarity(model.encode_image(images), model.encode_text(ids, lens), lens)
    torch.testing.assert_close(sims, torch.tensor(expected["sims"]), rtol=1e-5, atol=1e-6)
