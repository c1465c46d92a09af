"""``laps-export``: a trained checkpoint as a Hugging Face model folder (:mod:`laps.models.pretrained`).

The folder gets the model (``config.json``, ``model.safetensors``, the encoders' configs), the
run's tokenizer files, the dataset settings the model was evaluated with (``config.json``'s
``data``: ``max_words``, image size and normalisation) and a model card with the run's overrides
and test figures. It is written beside ``out`` and renamed into place, so a failure leaves no half
folder.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _run_dir(checkpoint: Path) -> Path:
    """The run folder of ``<run>/checkpoints/x.ckpt``."""
    return checkpoint.resolve().parent.parent


def model_card(source: str, config: Any, metrics: dict[str, float] | None,
               overrides: list[str] | None) -> str:
    """The model card: what the model is (exported from ``source``), its recipe, its test figures and
    how to load it."""
    backbone = config.backbone.get("name", "?")
    lines = [
        "---", "library_name: laps", "tags: [image-text-retrieval, laps]", "---", "",
        f"# LAPS {backbone} ({config.dataset.get('name', '?')})", "",
        ("A LAPS (Linguistic-Aware Patch Slimming, CVPR 2024) image-text retrieval model, exported by "
        f"`laps-export` from {source}."), "",
        "## Recipe", "", "Training overrides (`laps-train ...`):", "", "```",
        " ".join(overrides) if overrides else "(none recorded)", "```", "",
    ]
    if metrics:
        tests = {k: v for k, v in sorted(metrics.items()) if k.startswith("test")}
        lines += ["## Test figures", "", "| metric | value |", "| --- | --- |",
                  *[f"| {k} | {v:.2f} |" for k, v in tests.items()], ""]
    lines += [
        "## Use", "", "```python", "from laps.models import LAPSModel",
        'model = LAPSModel.from_pretrained("PATH_OR_HUB_ID")',
        "sims = model.similarity(model.encode_image(images), model.encode_text(ids, lengths), lengths)", "```",
        "", "or `laps-eval ckpt_path=PATH`, `laps-retrieve ... --ckpt PATH`.", "",
    ]
    return "\n".join(lines)


def export_checkpoint(checkpoint: str | Path, out: str | Path, overwrite: bool = False,
                      source: str | None = None) -> Path:
    """Write the Hugging Face folder of a laps checkpoint to ``out``; returns ``out``. ``source`` names
    where the model came from in the model card (default: the checkpoint's file name).

    Raises:
        FileExistsError: ``out`` exists and is not empty (without ``overwrite``).
    """
    from omegaconf import OmegaConf

    from laps.inference import load_for_inference

    checkpoint, out = Path(checkpoint), Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out}: exists and is not empty (pass --overwrite to replace it)")
    loaded = load_for_inference(checkpoint, device="cpu")
    run = _run_dir(checkpoint)
    metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else None
    over = run / ".hydra" / "overrides.yaml"
    overrides = list(OmegaConf.load(over)) if over.is_file() else None
    model = loaded.model
    model.model_card = model_card(source or f"`{checkpoint.name}`", loaded.config, metrics, overrides)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        loaded.tokenizer.tokenizer.save_pretrained(str(tmp))
        data = loaded.config.dataset
        config = json.loads((tmp / "config.json").read_text())
        config["data"] = {
            "tokenizer": ".", "max_words": loaded.max_words, "image_size": loaded.image_size,
            "image_mean": OmegaConf.to_object(data.image_mean) if data.get("image_mean") else None,
            "image_std": OmegaConf.to_object(data.image_std) if data.get("image_std") else None,
            "protocol": data.get("protocol"),
        }
        config["training"] = {"pooled_weight": float(loaded.config.model.get("pooled_weight", 0.0) or 0.0)}
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote %s: load it with LAPSModel.from_pretrained(%r)", out, str(out))
    return out
