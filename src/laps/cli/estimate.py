"""``laps-estimate``: the GPU memory and FLOPs of a ``laps-train`` configuration's training step,
estimated on this machine without a GPU (:func:`laps.estimate.estimate`)."""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from laps.cli.common import one_line_errors, register_resolvers
from laps.paths import config_dir

log = logging.getLogger(__name__)


def estimate_table(result: dict) -> None:
    """Print the estimate as a rich table."""
    from rich.console import Console
    from rich.table import Table

    per = "per GPU" if result["device"] == "cuda" else "CPU tensors, not RSS"
    table = Table(title=f"laps-estimate: {result['backbone']}, {result['precision']}, batch {result['batch_size']} "
                        f"x {result['world_size']} ({per})")
    table.add_column("figure")
    table.add_column("value", justify="right")
    rows = [
        ("peak (GiB)", f"{result['peak_gib']:.2f}  ({result['peak_step']} step)"),
        ("  dense step / hardest negatives", f"{result['peak_dense_gib']:.2f} / {result['peak_hardest_gib']:.2f}"),
        ("  parameters", f"{result['params_gib']:.2f}"),
        ("  gradients", f"{result['grads_gib']:.2f}"),
        ("  optimizer states", f"{result['optimizer_gib']:.2f}"),
        ("  activations and temporaries", f"{result['activations_gib']:.2f}"),
        ("  DDP gradient buckets", f"{result['ddp_buckets_gib']:.2f}"),
        ("parameters", f"{result['params'] / 1e6:.1f} M"),
        ("caption tokens", str(result["caption_length"])),
        ("TFLOPs per step / GFLOPs per pair", f"{result['flops_per_step'] / 1e12:.2f} / {result['flops_per_pair'] / 1e9:.1f}"),
    ]
    if "measured_peak_gib" in result:
        rows.append(("measured on this GPU (GiB)", f"{result['measured_peak_gib']:.2f}"))
    if isinstance(result.get("max_batch"), dict):
        rows.extend((f"max batch per GPU in {card} GiB", str(b)) for card, b in result["max_batch"].items())
    elif "max_batch" in result:
        rows.append((f"max batch per GPU in {result['max_memory_gib']:g} GiB", str(result["max_batch"])))
    for row in rows:
        table.add_row(*row)
    console = Console()
    console.print(table)
    console.print(f"Not counted: {'; '.join(result['not_counted'])}; add estimate.overhead_gib="
                  f"{result['overhead_gib']:g} and {result['fragmentation']:.0%} of the card for them.")


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="estimate")
@one_line_errors
def _main(cfg: DictConfig) -> float:
    from laps.estimate import estimate, write_estimate

    result = estimate(cfg, progress=log.info)
    path = write_estimate(result, cfg.paths.output_dir)
    estimate_table(result)
    log.info("estimate written to %s", path)
    return result["peak_gib"]


def main() -> None:
    register_resolvers()
    _main()


if __name__ == "__main__":
    main()
