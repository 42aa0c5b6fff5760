"""The served MLflow model (models-from-code): a column `image` of encoded bytes (base64 in
JSON) in; `label`, `error` ("" when fine) and one probability per class out. The `tta`
parameter (default true) turns the model's TTA views off for a request."""

from __future__ import annotations

import os
from typing import Any

import mlflow.models
import pandas as pd
from mlflow.pyfunc import PythonModel


class ImageModel(PythonModel):
    """`ImagePredictor` behind MLflow's pyfunc interface."""

    def load_context(self, context: Any) -> None:
        from visiontune.runtime import AutoMemory, configure_memory

        # Before the model's first tensor: each forward's activations then reuse memory
        # instead of faulting in fresh pages (served batches of 32: ~100 -> ~150 images/s).
        configure_memory(AutoMemory())
        from visiontune.serving.predictor import ImagePredictor

        device = os.environ.get("VISIONTUNE_DEVICE", "auto")  # auto (CUDA if any) | cpu | cuda
        self.predictor = ImagePredictor.from_file(context.artifacts["weights"], device=device)

    # pd.DataFrame: a type hint MLflow accepts without inferring a schema from it (the
    # signature is the logged one).
    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "image" not in frame.columns:
            raise ValueError(f"expected a column 'image'; got {list(frame.columns)}")
        tta = bool((params or {}).get("tta", True))
        probs, errors = self.predictor.predict_bytes(frame["image"].tolist(), tta=tta)
        classes = self.predictor.info.classes
        best = probs.nan_to_num(-1.0).argmax(dim=1).tolist()
        labels = ["" if error else classes[i] for i, error in zip(best, errors, strict=True)]
        columns = dict(zip(classes, probs.double().numpy().T, strict=True))
        return pd.DataFrame({"label": labels, "error": errors, **columns})


mlflow.models.set_model(ImageModel())
