"""Evaluation: TTA inference, metrics, the report figures and the predict command's core.

Submodules: `tta` (fixed views, one decode per image), `metrics` (scores from
probabilities), `evaluation` (the evaluate stage's work), `plots` and `report` (the report
stage), `predict` (top-k and submission tables for files and folders), `submission` (that
table's columns, torch-free). Import them by name:
this package imports none, so `visiontune predict` and the served model load neither
scikit-learn nor matplotlib (2 of the CLI's 4 s of start-up).
"""
