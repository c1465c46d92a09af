"""``laps-import-official PATH --out CKPT``: an official LAPS checkpoint as a laps checkpoint for ``laps-eval``;
``--format hf`` writes a Hugging Face model folder instead (as ``laps-export`` does for our checkpoints)."""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from laps.cli.common import register_resolvers
from laps.models.backbones import TEXT_ENCODER, backbone_for_vision
from laps.paths import config_dir

log = logging.getLogger("laps")


def backbone_option(vision_name: str) -> str:
    """The ``backbone`` config option (a file of ``configs/backbone/``) whose vision encoder is ``vision_name``."""
    try:
        return backbone_for_vision(vision_name).name
    except KeyError as err:
        raise ValueError(f"no backbone config uses the vision encoder {vision_name!r} ({err.args[0]})") from None


def official_overrides(hparams: dict[str, Any], vision_config: str | None, text_config: str | None,
                       tokenizer: str | None, vocab_size: int) -> list[str]:
    """Hydra overrides describing the official run's architecture (random init: weights come from the file)."""
    dataset = hparams.get("dataset") if hparams.get("dataset") in ("f30k", "coco") else "f30k"
    out = [
        "~experiment", f"dataset={dataset}", f"backbone={backbone_option(hparams['vision_backbone'])}", "backbone.pretrained=false",
        f"backbone.embed_size={int(hparams['embed_size'])}",
        f"ratios.sparse_ratio={float(hparams['sparse_ratio'])}", f"ratios.aggr_ratio={float(hparams['aggr_ratio'])}",
        f"model.margin={float(hparams.get('margin', 0.2))}", f"model.ratio_weight={float(hparams.get('ratio_weight', 2.0))}",
        f"backbone.text.vocab_size={vocab_size}",
        f"dataset.tokenizer={tokenizer or TEXT_ENCODER}",
    ]
    if vision_config:
        out.append(f"backbone.vision.name_or_path={Path(vision_config).resolve()}")
    if text_config:
        out.append(f"backbone.text.name_or_path={Path(text_config).resolve()}")
    return out


def import_official(path: str | Path, out: str | Path, vision_config: str | None = None,
                    text_config: str | None = None, tokenizer: str | None = None) -> Path:
    """Convert ``path`` and write ``out`` (``state_dict`` + ``laps_config``); returns ``out``."""
    from hydra.utils import instantiate

    from laps.compat.official import model_from_official, read_official_checkpoint
    from laps.training.checkpointing import atomic_torch_save

    register_resolvers()
    official = read_official_checkpoint(path)  # read once: official files are about 1 GB
    model = model_from_official(official, vision_config, text_config, source=path)
    vocab = int(model.text.backbone.config.vocab_size)
    overrides = official_overrides(official.hparams, vision_config, text_config, tokenizer, vocab)
    # "linear" where the file projects between equal widths (loading replaced the identity)
    overrides += [f"++backbone.{part}.projection={getattr(model, part).projection}" for part in ("vision", "text")]
    with initialize_config_dir(config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = "."
        cfg.paths.work_dir = "."
    cfg_dict = OmegaConf.to_container(cfg, resolve=True)
    rebuilt = instantiate(cfg.model.net)
    weights = model.state_dict()
    state = {f"net.{k}": v for k, v in weights.items()}
    missing, unexpected = rebuilt.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path}: the converted weights do not fit the laps configuration (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]})"
        )
    checkpoint = {
        "state_dict": state,
        "laps_config": cfg_dict,
        "official": {"source": str(path), "epoch": official.epoch, "best_rsum": official.best_rsum},
        "epoch": int(official.epoch or 0),
        "global_step": int(official.eiters or 0),
    }
    out = Path(out)
    atomic_torch_save(checkpoint, out)
    log.info("wrote %s: evaluate it with `laps-eval ckpt_path=%s`", out, out)
    return out


def import_official_folder(path: str | Path, out: str | Path, vision_config: str | None = None,
                           text_config: str | None = None, tokenizer: str | None = None,
                           overwrite: bool = False) -> Path:
    """Convert ``path`` into the Hugging Face folder ``out`` (through a laps checkpoint in a
    temporary folder, then :func:`laps.export.export_checkpoint`); returns ``out``."""
    from laps.export import export_checkpoint

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out}: exists and is not empty (pass --overwrite to replace it)")
    with tempfile.TemporaryDirectory(prefix="laps-import-") as tmp:
        ckpt = import_official(path, Path(tmp) / "checkpoints" / f"{Path(path).stem}.ckpt", vision_config,
                               text_config, tokenizer)
        return export_checkpoint(ckpt, out, overwrite=overwrite, source=f"the official checkpoint {Path(path).name}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="laps-import-official", description=__doc__)
    parser.add_argument("path", help="official model_best.pth / checkpoint.pth")
    parser.add_argument("--out", required=True, help="laps checkpoint (or, with --format hf, folder) to write")
    parser.add_argument("--format", choices=["ckpt", "hf"], default="ckpt",
                        help="ckpt: a laps checkpoint; hf: a Hugging Face model folder (model.safetensors, "
                             "config.json, tokenizer, model card)")
    parser.add_argument("--overwrite", action="store_true", help="with --format hf: replace a non-empty folder")
    parser.add_argument("--vision-config", help="config.json (or its folder) replacing the official vision backbone's")
    parser.add_argument("--text-config", help=f"config.json (or its folder) replacing {TEXT_ENCODER}'s")
    parser.add_argument("--tokenizer", help=f"tokenizer hub name or folder (default {TEXT_ENCODER})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.format == "hf":
            import_official_folder(args.path, args.out, args.vision_config, args.text_config, args.tokenizer,
                                   overwrite=args.overwrite)
        else:
            import_official(args.path, args.out, args.vision_config, args.text_config, args.tokenizer)
    except (ValueError, OSError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
