"""The code of the registered MLflow Model (MLflow "models from code": this file is copied into
every model and run when it loads, instead of unpickling an object)."""

import mlflow.models

from entityclip.registry import MatcherModel

mlflow.models.set_model(MatcherModel())
