"""Evaluation: TTA inference, metrics, report figures and `visiontune predict`'s core.
Import submodules by name: this package imports none, so `visiontune predict` and the
served model load neither scikit-learn nor matplotlib (2 of the CLI's 4 s of start-up)."""
