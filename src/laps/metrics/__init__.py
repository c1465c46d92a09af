"""Retrieval metrics computed from a similarity matrix."""

from laps.metrics.retrieval import coco_1k_metrics, metrics_rows, retrieval_metrics, retrieval_ranks

__all__ = ["coco_1k_metrics", "metrics_rows", "retrieval_metrics", "retrieval_ranks"]
