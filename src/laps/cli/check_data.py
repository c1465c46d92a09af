"""``laps-check-data dataset=f30k dataset.root=DIR``: validate a dataset folder in the official layout.

For each split present (``dataset.train_split``, ``val_split``, ``test_split``, or ``check.splits``): counts
(captions, images, captions per image), ids missing from ``id_mapping.json``, missing image files and
unreadable/corrupt ones (each opened and decoded, with a progress bar). Prints a summary table; exits with
code 1 when a problem is found, naming the file and the caption line.
"""

from __future__ import annotations

import logging
import sys
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from laps.data.datasets import IMAGE_ERRORS, BadImageError, open_image
from laps.data.splits import (
    DataError,
    SplitIndex,
    image_path,
    read_split,
    resolve_id_mapping,
    resolve_images_root,
    split_files,
)
from laps.paths import config_dir

__all__ = [
    "DataReport",
    "ImageProblem",
    "SplitReport",
    "check_dataset",
    "check_from_config",
    "main",
    "render_report",
]

log = logging.getLogger(__name__)


@dataclass
class ImageProblem:
    """A bad image, or an id without a mapping entry, with the first caption line that uses it."""

    image_id: str
    line: int  # 1-based line in caps_file
    caps_file: str
    path: str = ""
    reason: str = ""

    def describe(self) -> str:
        where = f"line {self.line} of {self.caps_file}"
        if self.path:
            return f"{self.path}: {self.reason} (image id {self.image_id}, caption {where})"
        return f"image id {self.image_id} not in the id mapping (caption {where})"


@dataclass
class SplitReport:
    """The findings for one split."""

    split: str
    caps_file: str
    present: bool = True
    error: str | None = None
    captions: int = 0
    images: int = 0
    captions_per_image: Counter = field(default_factory=Counter)
    contiguous: bool = True
    unmapped: list[ImageProblem] = field(default_factory=list)
    missing: list[ImageProblem] = field(default_factory=list)
    unreadable: list[ImageProblem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None and not (self.unmapped or self.missing or self.unreadable)


@dataclass
class DataReport:
    """The findings for a dataset folder; ``ok`` is False when any problem was found."""

    root: str
    images_root: str
    mapping: str
    mapping_entries: int | None = None
    mapping_error: str | None = None
    splits: list[SplitReport] = field(default_factory=list)
    images_checked: int = 0

    @property
    def ok(self) -> bool:
        splits_ok = any(s.present for s in self.splits) and all(s.ok for s in self.splits)
        return self.mapping_error is None and splits_ok

    def problems(self) -> list[str]:
        """Every problem, one line each, naming the file and caption line."""
        out: list[str] = []
        if self.mapping_error:
            out.append(self.mapping_error)
        if not any(s.present for s in self.splits):
            names = ", ".join(s.split for s in self.splits) or "(none)"
            out.append(f"No split found in {self.root} (looked for {names}: {{split}}_caps.txt / _ids.txt).")
        for s in self.splits:
            if s.error:
                out.append(f"[{s.split}] {s.error}")
            for p in (*s.unmapped, *s.missing, *s.unreadable):
                out.append(f"[{s.split}] {p.describe()}")
        return out


def _check_file(path: Path, decode: bool) -> str | None:
    """None if the image is fine, else the reason."""
    if decode:
        try:
            open_image(path)
        except BadImageError as err:
            return err.reason
        return None
    if not path.is_file():
        return "missing"
    try:
        with Image.open(path) as img:
            img.verify()
    except IMAGE_ERRORS as err:
        return f"unreadable ({type(err).__name__}: {err})"
    return None


def check_dataset(
    root: str | Path,
    splits: Sequence[str],
    images_dir: str | Path | None = ".",
    id_mapping: str | Path | None = "id_mapping.json",
    check_images: bool = True,
    decode: bool = True,
    workers: int = 4,
    progress: bool = False,
    console: Console | None = None,
) -> DataReport:
    """Check a dataset folder (see the module doc); never raises on data problems, they go in the report.

    Args:
        root, images_dir, id_mapping: as the dataset config (``id_mapping=None``: COCO file names).
        splits: split names; a split with neither file is reported as absent (not a problem).
        check_images: look at the image files at all. decode: fully decode each (catches truncated
            files) rather than PIL's quicker ``verify()``. workers: threads reading images.
        progress: show a rich progress bar on ``console``.
    """
    root = Path(root).expanduser()
    images_root = resolve_images_root(root, images_dir)
    report = DataReport(root=str(root), images_root=str(images_root), mapping=str(id_mapping))
    mapping: dict[str, str] | None = None
    try:
        mapping = resolve_id_mapping(root, images_root, id_mapping)
        report.mapping_entries = None if mapping is None else len(mapping)
        if mapping is None:
            report.mapping = "COCO file names"
    except DataError as err:
        report.mapping_error = str(err)

    # path -> list of (split report, problem template); each file checked once.
    uses: dict[Path, list[tuple[SplitReport, ImageProblem]]] = {}
    for split in dict.fromkeys(splits):
        caps, ids_file = split_files(root, split)
        rep = SplitReport(split=split, caps_file=str(caps))
        report.splits.append(rep)
        if not caps.exists() and not ids_file.exists():
            rep.present = False
            continue
        try:
            _captions, ids = read_split(root, split)
        except DataError as err:
            rep.error = str(err)
            continue
        index = SplitIndex.from_ids(ids)
        rep.captions, rep.images = index.num_captions, index.num_images
        rep.captions_per_image = index.captions_per_image()
        rep.contiguous = index.is_contiguous()
        if report.mapping_error is not None:
            continue
        for image_id, line in zip(index.image_ids, index.first_line):
            problem = ImageProblem(image_id=image_id, line=line + 1, caps_file=str(caps))
            try:
                path = image_path(image_id, mapping, images_root)
            except DataError as err:  # not a COCO image number
                problem.path, problem.reason = image_id, str(err)
                rep.unreadable.append(problem)
                continue
            if path is None:
                rep.unmapped.append(problem)
                continue
            problem.path = str(path)
            uses.setdefault(path, []).append((rep, problem))

    if check_images and uses:
        paths = list(uses)
        console = console or Console(stderr=True)
        bar = Progress(
            TextColumn("checking images"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
            console=console, disable=not progress, transient=True,
        )
        with bar, ThreadPoolExecutor(max_workers=max(1, int(workers))) as pool:
            task = bar.add_task("images", total=len(paths))
            for path, reason in zip(paths, pool.map(lambda p: _check_file(p, decode), paths)):
                bar.advance(task)
                if reason is None:
                    continue
                for rep, problem in uses[path]:
                    problem.reason = reason
                    (rep.missing if reason == "missing" else rep.unreadable).append(problem)
        report.images_checked = len(paths)
    return report


def _splits_from_config(cfg: DictConfig) -> list[str]:
    chosen = OmegaConf.select(cfg, "check.splits")
    if chosen:
        return [str(s) for s in ([chosen] if isinstance(chosen, str) else chosen)]
    ds = cfg.dataset
    return [str(s) for s in dict.fromkeys(ds.get(k) for k in ("train_split", "val_split", "test_split")) if s]


def check_from_config(cfg: DictConfig, progress: bool = True, console: Console | None = None) -> DataReport:
    """:func:`check_dataset` on ``cfg.dataset`` with the options of ``cfg.check``."""
    ds = cfg.dataset
    check = cfg.get("check") or {}
    return check_dataset(
        root=ds.root,
        splits=_splits_from_config(cfg),
        images_dir=ds.get("images_dir", "."),
        id_mapping=ds.get("id_mapping", "id_mapping.json"),
        check_images=bool(check.get("images", True)),
        decode=bool(check.get("decode", True)),
        workers=int(check.get("workers", 4)),
        progress=progress,
        console=console,
    )


def render_report(report: DataReport, console: Console, max_listed: int = 20) -> None:
    """Print the summary table and the problems (at most ``max_listed`` of each kind per split)."""
    mapping = report.mapping
    if report.mapping_entries is not None:
        mapping += f" ({report.mapping_entries:,} ids)"
    table = Table(title=f"Dataset {report.root}", caption=f"images: {report.images_root}; mapping: {mapping}")
    for col in ("split", "captions", "images", "caps/image", "unmapped", "missing", "unreadable", "status"):
        left = col in ("split", "caps/image", "status")
        table.add_column(col, justify="left" if left else "right", no_wrap=True)
    for s in report.splits:
        if not s.present:
            table.add_row(s.split, "-", "-", "-", "-", "-", "-", "[dim]absent[/dim]")
            continue
        dist = ", ".join(f"{k}: {v:,}" for k, v in sorted(s.captions_per_image.items())) or "-"
        if not s.contiguous:
            dist += " (not consecutive)"
        status = "[green]ok[/green]" if s.ok else "[red]problems[/red]"
        if s.error:
            status = "[red]unreadable split[/red]"
        elif report.mapping_error:
            status = "[yellow]images not checked[/yellow]"
        table.add_row(
            s.split, f"{s.captions:,}", f"{s.images:,}", dist, f"{len(s.unmapped):,}",
            f"{len(s.missing):,}", f"{len(s.unreadable):,}", status,
        )
    console.print(table)
    if report.mapping_error:
        console.print(f"[red]id mapping:[/red] {report.mapping_error}")
    for s in report.splits:
        if s.error:
            console.print(f"[red]{s.split}:[/red] {s.error}")
        for kind, items in (("ids not in the mapping", s.unmapped), ("missing images", s.missing),
                            ("unreadable images", s.unreadable)):
            if not items:
                continue
            console.print(f"[red]{s.split}: {len(items):,} {kind}[/red]")
            for p in items[:max_listed]:
                console.print(f"  {p.describe()}", highlight=False, soft_wrap=True)
            if len(items) > max_listed:
                console.print(f"  ... and {len(items) - max_listed:,} more (check.max_listed)")
    if not any(s.present for s in report.splits):
        console.print(f"[red]{report.problems()[-1]}[/red]")
    if report.ok:
        console.print(f"[green]No problems found[/green] ({report.images_checked:,} image files checked).")
    else:
        n = len(report.problems())
        console.print(f"[red]{n:,} problem{'s' if n != 1 else ''} found.[/red]")


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="check_data")
def _app(cfg: DictConfig) -> None:
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 120))
    report = check_from_config(cfg, progress=True, console=Console(stderr=True))
    render_report(report, console, max_listed=int(OmegaConf.select(cfg, "check.max_listed", default=20)))
    if not report.ok:
        sys.exit(1)


def main() -> Any:
    """Console script ``laps-check-data``."""
    return _app()


if __name__ == "__main__":
    main()
