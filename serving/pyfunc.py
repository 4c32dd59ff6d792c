"""The MLflow pyfunc of one exported size, logged as *model from code* (nothing is pickled).

``predict`` takes a table with a ``history`` column (lists of original item ids, oldest first)
and returns, per row, ``item_ids`` and ``scores`` of the top ``k`` items. Parameters ``k`` and
``exclude_seen`` may be passed at call time. ``mlflow models serve -m MODEL_URI --env-manager local``
serves it as a REST endpoint.
"""

from __future__ import annotations


import mlflow
import pandas as pd


class SizedRecommenderPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        import serving

        self.model = serving.load(context.artifacts["export"])

    # pd.DataFrame: a hint MLflow neither validates against nor infers a signature from (the signature
    # is logged with the model); without a hint MLflow warns at every definition of this class
    def predict(self, context, model_input: pd.DataFrame, params=None):
        params = params or {}
        if isinstance(model_input, pd.DataFrame):
            if "history" not in model_input.columns:
                raise ValueError(f"the input needs a 'history' column, got columns {list(model_input.columns)}")
            histories = [list(h) for h in model_input["history"]]
        elif isinstance(model_input, dict) and "history" in model_input:
            histories = [list(h) for h in model_input["history"]]
        else:
            histories = [list(h) for h in model_input]
        results = self.model.recommend(
            histories,
            k=int(params.get("k", 10)),
            exclude_seen=bool(params.get("exclude_seen", True)),
            on_unknown="skip",
        )
        return pd.DataFrame(
            {"item_ids": [[i for i, _ in r] for r in results], "scores": [[s for _, s in r] for r in results]}
        )


mlflow.models.set_model(SizedRecommenderPyfunc())
