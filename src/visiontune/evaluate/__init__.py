"""Evaluation: TTA inference, metrics, the report figures and the predict command's core.

Submodules: `tta` (fixed views, one decode per image), `metrics` (scores from
probabilities), `evaluation` (the evaluate stage's work), `plots` and `report` (the report
stage), `predict` (top-k for files and folders). The report's names load on first use:
they bring matplotlib, which scoring a model does not need (a lent GPU machine lacks it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from visiontune.evaluate.evaluation import Evaluation, evaluate_model, score_predictions
from visiontune.evaluate.predict import Prediction, collect_inputs, predict_files
from visiontune.evaluate.tta import (
    TtaDataset,
    TtaView,
    ViewMaker,
    ViewPredictions,
    average_views,
    predict_views,
    tta_views,
)

if TYPE_CHECKING:
    from visiontune.evaluate.report import ReportFiles, build_report, read_probabilities

_REPORT_NAMES = ("ReportFiles", "build_report", "read_probabilities")


def __getattr__(name: str) -> Any:
    if name in _REPORT_NAMES:
        from visiontune.evaluate import report

        return getattr(report, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Evaluation",
    "Prediction",
    "ReportFiles",
    "TtaDataset",
    "TtaView",
    "ViewMaker",
    "ViewPredictions",
    "average_views",
    "build_report",
    "collect_inputs",
    "evaluate_model",
    "predict_files",
    "predict_views",
    "read_probabilities",
    "score_predictions",
    "tta_views",
]
