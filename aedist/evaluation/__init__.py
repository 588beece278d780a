"""Evaluation: metric passes over a split (passes), the figure registry (figures), a finished run (run)."""

from aedist.evaluation.figures import FIGURES, draw_figures, eval_split, load_probe
from aedist.evaluation.passes import evaluate_split, knn_metric

__all__ = ["FIGURES", "draw_figures", "eval_split", "evaluate_split", "knn_metric", "load_probe"]
