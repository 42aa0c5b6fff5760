"""The trained model anywhere: `predictor` is the one prediction path of `visiontune predict`
and of `image_model`, the MLflow model that serves it. Imports nothing, so a served model
loads only what it uses."""
