"""The MLflow pyfunc of one exported size, logged as *model from code* (nothing is pickled).

``predict`` takes a table with a ``history`` column (lists of original item ids, oldest first:
text or integers, as the catalogue holds them) and returns, per row, ``item_ids`` and ``scores``
of the top ``k`` items, the ``unknown`` ids of the history and ``fallback`` (true when no id
named an item, so that the items are the most popular ones). Parameters ``k``, ``exclude_seen``
and ``strict`` may be passed at call time. Requests are checked and answered by
``serving/online.py``, exactly as the REST endpoint ``serving.rest`` (``make serve``) does; bad
ones raise an ``MlflowException`` (HTTP 400 when served) with the one-line reason.

To serve it with MLflow's own server, ``uvicorn`` must be on ``PATH`` (it is in ``.venv/bin``)::

    PATH=$PWD/.venv/bin:$PATH mlflow models serve -m models:/NAME-d64@champion --env-manager local --port 5001

``make serve MODEL=...`` is usually the better choice (docs/serving.md says when).
"""

from __future__ import annotations

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE


def _histories(model_input) -> list:
    if isinstance(model_input, pd.DataFrame):
        if "history" not in model_input.columns:
            raise MlflowException(
                f"the input needs a 'history' column, got columns {list(model_input.columns)}", INVALID_PARAMETER_VALUE
            )
        model_input = model_input["history"]
    elif isinstance(model_input, dict) and "history" in model_input:
        model_input = model_input["history"]
    # numpy arrays and scalars (what MLflow hands over) to plain Python values
    return [h.tolist() if hasattr(h, "tolist") else list(h) for h in model_input]


class SizedRecommenderPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        import serving

        self.model = serving.load(context.artifacts["export"])

    # pd.DataFrame: a hint MLflow neither validates against nor infers a signature from (the signature
    # is logged with the model); without a hint MLflow warns at every definition of this class
    def predict(self, context, model_input: pd.DataFrame, params=None):
        from serving.online import RequestError, answer, parse_request

        body = {"histories": _histories(model_input), **(params or {})}
        try:
            response = answer(self.model, parse_request(body, len(self.model.item_ids)))
        except RequestError as exc:
            raise MlflowException(str(exc), INVALID_PARAMETER_VALUE) from None
        return pd.DataFrame(response["results"])


mlflow.models.set_model(SizedRecommenderPyfunc())
