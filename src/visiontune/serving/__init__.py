"""The trained model anywhere: one prediction path for `visiontune predict` and MLflow.

Submodules: `predictor` (model file + its inference settings → probabilities for image
files or encoded bytes), `image_model` (the MLflow models-from-code file that serves it:
MLflow runs it, nothing in visiontune imports it, so it is the one module outside
`tracking` that imports mlflow). This package imports nothing, so a served model loads
only what it uses.
"""
