"""Evaluation metrics for CTR predictions (`core`) and the paired bootstrap over users (`bootstrap`)."""

from llmhyper.ctr.metrics.bootstrap import (
    boot_values,
    bootstrap_interval,
    interval,
    paired_bootstrap,
    resample_indices,
)
from llmhyper.ctr.metrics.core import (
    METRICS,
    MetricFn,
    auc,
    calibration_ratio,
    ece,
    log_loss,
    mean_ndcg_at_k,
    mean_per_ad_auc,
    ndcg_at_k,
    per_ad_auc,
    pooled_auc,
)

__all__ = [
    "auc",
    "pooled_auc",
    "per_ad_auc",
    "mean_per_ad_auc",
    "ndcg_at_k",
    "mean_ndcg_at_k",
    "log_loss",
    "ece",
    "calibration_ratio",
    "METRICS",
    "MetricFn",
    "paired_bootstrap",
    "bootstrap_interval",
    "resample_indices",
    "boot_values",
    "interval",
]
