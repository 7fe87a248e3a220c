"""Evaluation: metric math, feature networks, reference statistics, the metric suite and best-checkpoint tracking."""

from sida_diffusers.evaluation.features import DINOv2Features, InceptionFeatures, resolve_inception_path, to_rgb
from sida_diffusers.evaluation.references import Reference, load_reference, save_reference
from sida_diffusers.evaluation.stats import (
                                             feature_statistics,
                                             frechet_distance,
                                             inception_score,
                                             kernel_inception_distance,
                                             precision_recall,
)
from sida_diffusers.evaluation.suite import (
                                             MetricSuite,
                                             available_metrics,
                                             count_tag,
                                             evaluate_repeats,
                                             parse_result_key,
                                             parse_step_result_key,
                                             pipeline_sample_fn,
                                             register_feature_metric,
                                             result_keys,
                                             step_result_key,
)
from sida_diffusers.evaluation.tracking import BestTracker, append_metrics_jsonl, plot_curves


__all__ = [
    "BestTracker", "DINOv2Features", "InceptionFeatures", "MetricSuite", "Reference", "append_metrics_jsonl",
    "available_metrics", "count_tag", "evaluate_repeats", "feature_statistics", "frechet_distance", "inception_score",
    "kernel_inception_distance", "load_reference", "parse_result_key", "parse_step_result_key", "pipeline_sample_fn",
    "plot_curves", "precision_recall", "register_feature_metric", "resolve_inception_path", "result_keys",
    "save_reference", "step_result_key", "to_rgb",
]
