"""DVT models for MindSpore: `create_model(name, ...)` and the cascade's parts."""

from .dvt import DVT
from .registry import create_model, list_models, model_spec
from .spec import DVTSpec, Tokenizer
from .stage import Stage
from .weights import CheckpointMismatch, load_weights

__all__ = ["DVT", "DVTSpec", "Stage", "Tokenizer", "CheckpointMismatch", "create_model", "list_models",
           "load_weights", "model_spec"]
