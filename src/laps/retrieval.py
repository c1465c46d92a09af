"""Retrieval over a folder of images: the index (its file format, resumable building) and the
search (full LAPS scoring, or a first stage of pooled cosines re-ranked by the head).

``laps-retrieve`` (:mod:`laps.cli.retrieve`) is the command on top; the file is loaded with
:func:`laps.compat.serialization.safe_load`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import Tensor

from laps.inference import synchronize
from laps.models.head import LAPSHead, PreparedImages
from laps.models.pooling import pool_image, pool_text
from laps.training.checkpointing import atomic_torch_save

log = logging.getLogger(__name__)

INDEX_FORMAT = "laps-retrieve-index"
INDEX_VERSION = 1
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


# ---------------------------------------------------------------------------------------------- index
def list_images(root: str | Path) -> list[str]:
    """Image files under ``root`` (recursively, suffix case ignored), as sorted POSIX paths relative to it."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--images {root}: no such folder")
    found = [
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    ]
    return sorted(found)


def load_index(path: str | Path) -> dict[str, Any]:
    """Read an index written by :func:`build_index` (with ``safe_load``) and check its format."""
    from laps.compat.serialization import safe_load

    data = safe_load(path)
    if not isinstance(data, dict) or data.get("format") != INDEX_FORMAT:
        raise ValueError(f"{path} is not a laps-retrieve index (write one with `laps-retrieve index`)")
    if int(data.get("version", 0)) > INDEX_VERSION:
        raise ValueError(f"{path}: index version {data['version']} is newer than this laps ({INDEX_VERSION})")
    return data


class _ImageFiles(torch.utils.data.Dataset):
    """Decoded and transformed images; a bad file gives ``None`` (reported and skipped)."""

    def __init__(self, root: Path, rel_paths: list[str], transform) -> None:
        self.root, self.rel_paths, self.transform = root, rel_paths, transform

    def __len__(self) -> int:
        return len(self.rel_paths)

    def __getitem__(self, i: int) -> tuple[int, Tensor | None, str]:
        from laps.data.datasets import BadImageError, open_image

        try:
            return i, self.transform(open_image(self.root / self.rel_paths[i])), ""
        except BadImageError as err:
            return i, None, err.reason


def _collate(items):
    return items


@dataclass
class IndexReport:
    """What :func:`build_index` did."""

    out: str
    total: int
    encoded: int
    reused: int
    failed: list[str] = field(default_factory=list)
    removed: int = 0
    seconds: float = 0.0


def build_index(
    ckpt: str | Path,
    images: str | Path,
    out: str | Path,
    batch_size: int = 32,
    device: str = "auto",
    fp16: bool = False,
    save_every: int = 20,
    workers: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    engine: Any = None,
) -> IndexReport:
    """Encode the images under ``images`` into ``out``, resuming from a partial ``out`` when there is one.

    Args:
        ckpt: the laps checkpoint (its vision encoder makes the embeddings).
        images: folder scanned recursively for ``.jpg``/``.jpeg``/``.png``.
        out: the index file; when it exists (partial or complete, made with the same model, the same
            folder and dtype) its images are kept and only the others encoded.
        batch_size: images per forward pass. save_every: batches between partial writes.
        fp16: store the image tokens as float16 (the pooled vectors stay float32).
        workers: DataLoader processes decoding images. overwrite: ignore an existing ``out``.
        engine: an already loaded :class:`laps.inference.InferenceModel` (else loaded from ``ckpt``).
    """
    from tqdm.auto import tqdm

    from laps.inference import load_for_inference

    if batch_size < 1 or save_every < 1:
        raise ValueError("--batch-size and --save-every must be positive")
    start = time.perf_counter()
    root = Path(images).resolve()
    out = Path(out)
    listing = list_images(root)
    if not listing:
        raise FileNotFoundError(f"--images {root}: no .jpg/.jpeg/.png files found")
    engine = engine or load_for_inference(ckpt, device=device)
    fingerprint = engine.fingerprint()
    dtype = torch.float16 if fp16 else torch.float32

    paths: list[str] = []
    failed: list[str] = []
    emb_chunks: list[Tensor] = []
    pool_chunks: list[Tensor] = []
    removed = 0
    if out.exists() and not overwrite:
        from laps.compat.serialization import DamagedCheckpointError

        try:
            old = load_index(out)
        except DamagedCheckpointError as err:
            why = str(err).removeprefix(f"{out}: ")
            raise ValueError(f"{out}: the index to resume is damaged ({why}); pass --overwrite to start afresh "
                             "or another --out") from None
        problems = []
        if old.get("fingerprint") != fingerprint:
            problems.append("another model")
        if old.get("root") != str(root):
            problems.append(f"another folder ({old.get('root')})")
        if old.get("dtype") != str(dtype).removeprefix("torch."):
            problems.append(f"dtype {old.get('dtype')}")
        if problems:
            raise ValueError(f"{out} was made with {', '.join(problems)}: pass --overwrite or another --out")
        present = set(listing)
        keep = [i for i, p in enumerate(old["paths"]) if p in present]
        removed = len(old["paths"]) - len(keep)
        if keep:
            idx = torch.tensor(keep, dtype=torch.long)
            emb_chunks.append(old["embeddings"].index_select(0, idx))
            pool_chunks.append(old["pooled"].index_select(0, idx))
            paths = [old["paths"][i] for i in keep]
        failed = [p for p in old.get("failed", []) if p in present]
        if removed:
            log.info("%d indexed images are no longer under %s: dropped", removed, root)
    done = set(paths) | set(failed)
    todo = [p for p in listing if p not in done]
    reused = len(paths)
    log.info("%s: %d images, %d already indexed, %d to encode", root, len(listing), reused, len(todo))

    def snapshot(complete: bool) -> dict[str, Any]:
        emb = torch.cat(emb_chunks) if emb_chunks else torch.empty(0, 0, 0, dtype=dtype)
        pooled = torch.cat(pool_chunks) if pool_chunks else torch.empty(0, 0)
        if len(emb_chunks) > 1:  # keep one tensor, so the next snapshot does not re-concatenate
            emb_chunks[:] = [emb]
            pool_chunks[:] = [pooled]
        return {
            "format": INDEX_FORMAT,
            "version": INDEX_VERSION,
            "root": str(root),
            "paths": list(paths),
            "failed": list(failed),
            "embeddings": emb,
            "pooled": pooled,
            "dtype": str(dtype).removeprefix("torch."),
            "fingerprint": fingerprint,
            "checkpoint": str(Path(ckpt).resolve()) if ckpt else "",
            "num_patches": int(engine.head.num_patches),
            "has_cls": bool(engine.head.has_cls),
            "embed_size": int(engine.model.embed_size),
            "complete": complete,
        }

    loader = torch.utils.data.DataLoader(
        _ImageFiles(root, todo, engine.transform), batch_size=batch_size, shuffle=False,
        num_workers=workers, collate_fn=_collate,
    )
    bar = tqdm(total=len(todo), desc="Encoding images", unit="img", disable=not progress)
    encoded = 0
    try:
        for n_batch, items in enumerate(loader, 1):
            good = [(i, x) for i, x, _ in items if x is not None]
            for i, x, reason in items:
                if x is None:
                    log.warning("skipping %s: %s", root / todo[i], reason)
                    failed.append(todo[i])
            if good:
                tokens = engine.encode_images(torch.stack([x for _, x in good]))
                emb_chunks.append(tokens.to(dtype).cpu())
                pool_chunks.append(pool_image(tokens).cpu())
                paths.extend(todo[i] for i, _ in good)
                encoded += len(good)
            bar.update(len(items))
            if n_batch % save_every == 0:
                atomic_torch_save(snapshot(complete=False), out)
    finally:
        bar.close()
    atomic_torch_save(snapshot(complete=True), out)
    seconds = time.perf_counter() - start
    log.debug("wrote %s: %d images (%d encoded now, %d failed) in %.1f s", out, len(paths), encoded, len(failed), seconds)
    return IndexReport(str(out), len(paths), encoded, reused, failed, removed, seconds)


# ---------------------------------------------------------------------------------------------- search
@dataclass
class QueryResult:
    """One query's ranking: ``indices`` into the index, LAPS ``scores`` (and stage-1 ``cosine``)."""

    query: str
    indices: list[int]
    paths: list[str]
    scores: list[float]
    cosine: list[float] | None = None


@dataclass
class SearchStats:
    """Pairs scored and seconds per query of each stage (``stage1`` only with reranking)."""

    mode: str
    queries: int
    images: int
    laps_pairs: int
    cosine_pairs: int
    text_seconds_per_query: float
    stage1_seconds_per_query: float
    stage2_seconds_per_query: float
    rerank: int | None = None
    prerank: str | None = None


PRERANK = ("auto", "mean", "cls")


def resolve_prerank(prerank: str, engine: Any, index: dict[str, Any]) -> str:
    """``auto`` -> ``mean`` for a model trained with ``model.pooled_weight > 0``, else ``cls`` when the
    index's images have a [CLS] token, else ``mean``; other values unchanged."""
    if prerank != "auto":
        return prerank
    trained = float(OmegaConf.select(engine.config, "model.pooled_weight", default=0.0) or 0.0) > 0
    return "cls" if index.get("has_cls", False) and not trained else "mean"


def prerank_vectors(index: dict[str, Any], prerank: str = "mean") -> Tensor:
    """``(N, C)`` normalised image vectors of the first stage: the stored mean of the tokens (``mean``)
    or the [CLS] token (``cls``)."""
    if prerank == "mean":
        return index["pooled"].float()
    if prerank == "cls":
        if not index.get("has_cls", False):
            raise ValueError("--prerank cls: the index's vision encoder has no [CLS] token; use --prerank mean")
        return F.normalize(index["embeddings"][:, 0].float(), dim=-1)
    raise ValueError(f"--prerank must be one of {PRERANK}, got {prerank!r}")


RERANK_UNION = 1024  # candidate images whose head inputs are prepared at once when re-ranking


def _prepare_images(head: Any, emb: Tensor, rows: Tensor, block: int, device: torch.device) -> PreparedImages:
    """``head.prepare_images`` of the images ``rows`` of ``emb``, ``block`` at a time, concatenated."""
    return PreparedImages.cat([
        head.prepare_images(emb.index_select(0, rows[s : s + block]).to(device).float())
        for s in range(0, rows.numel(), block)
    ])


@torch.no_grad()
def search(
    engine: Any,
    index: dict[str, Any],
    queries: list[str],
    top_k: int = 10,
    rerank: int | None = None,
    block: int = 128,
    check_model: bool = True,
    prerank: str = "auto",
) -> tuple[list[QueryResult], SearchStats]:
    """Rank the index's images for every query.

    Without ``rerank``: the head's scores of every (image, query) pair, ``block`` images at a time
    (a ``model=vse`` model: the cosine of its pooled vectors; it refuses ``rerank``). With
    ``rerank=K``: cosine similarity of the pooled embeddings for every pair (``prerank``: the image's
    mean token, or its [CLS] token, or ``auto``, see :func:`resolve_prerank`; against the mean of
    the query's words), then LAPS scores of each query's top ``K`` only. Returns the top ``top_k``
    of each query and the stage statistics.
    """
    from laps.evaluation import score_matrix

    if not queries:
        raise ValueError("give at least one query")
    if top_k < 1 or block < 1 or (rerank is not None and rerank < 1):
        raise ValueError("--top-k, --rerank and --block must be positive")
    if rerank is not None and not isinstance(engine.head, LAPSHead):
        raise ValueError(f"--rerank re-scores with the LAPS head, and this {type(engine.model).__name__} (model=vse) "
                         "has none: it is one stage already (a pooled cosine); search without --rerank")
    if check_model and index.get("fingerprint") != engine.fingerprint():
        raise ValueError(
            "the index was made with another vision encoder than this checkpoint's: "
            "index the images again with this --ckpt"
        )
    head, device = engine.head, engine.device
    emb: Tensor = index["embeddings"]
    n_img = emb.shape[0]
    if n_img == 0:
        raise ValueError("the index holds no images")
    paths = index["paths"]
    n_q = len(queries)

    synchronize(device)
    t0 = time.perf_counter()
    cap, lens = engine.encode_captions(list(queries))
    synchronize(device)
    t_text = time.perf_counter() - t0

    results: list[QueryResult] = []
    if rerank is None:
        t0 = time.perf_counter()
        sims = score_matrix(head, emb, cap, lens, image_block=block, progress=False, device=device)  # (n_img, n_q)
        synchronize(device)
        t_stage2 = time.perf_counter() - t0
        k = min(top_k, n_img)
        top = sims.topk(k, dim=0)
        for j, qtext in enumerate(queries):
            idx = top.indices[:, j].tolist()
            results.append(QueryResult(qtext, idx, [paths[i] for i in idx], top.values[:, j].tolist()))
        stats = SearchStats("full", n_q, n_img, n_img * n_q, 0, t_text / n_q, 0.0, t_stage2 / n_q)
        return results, stats

    k_re = min(int(rerank), n_img)
    prerank = resolve_prerank(prerank, engine, index)
    t0 = time.perf_counter()
    pooled = prerank_vectors(index, prerank).to(device)
    cos = pool_text(cap, lens) @ pooled.t()  # (n_q, n_img)
    cand = cos.topk(k_re, dim=1)
    synchronize(device)
    t_stage1 = time.perf_counter() - t0
    t0 = time.perf_counter()
    # The image-only work of the head (prepare_images) is done once per candidate image of a group of
    # queries, not once per (query, candidate); each query then scores its own K candidates.
    caption = head.prepare_captions(cap, lens)
    group = max(1, RERANK_UNION // k_re)
    cand_idx, cand_val = cand.indices.cpu(), cand.values.cpu()
    for g in range(0, n_q, group):
        union, inverse = torch.unique(cand_idx[g : g + group], return_inverse=True)
        prepared = _prepare_images(head, emb, union, block, device)
        for j in range(g, min(g + group, n_q)):
            rows = inverse[j - g].to(device)
            sims = head.score_prepared(prepared.take(rows), caption.take(slice(j, j + 1)))[0][:, 0].float().cpu()
            top = sims.topk(min(top_k, k_re))
            chosen = cand_idx[j][top.indices]
            results.append(QueryResult(
                queries[j], chosen.tolist(), [paths[i] for i in chosen.tolist()], top.values.tolist(),
                cand_val[j][top.indices].tolist(),
            ))
    synchronize(device)
    t_stage2 = time.perf_counter() - t0
    stats = SearchStats("rerank", n_q, n_img, k_re * n_q, n_img * n_q, t_text / n_q, t_stage1 / n_q,
                        t_stage2 / n_q, rerank=k_re, prerank=prerank)
    return results, stats
