from .registry import MODELS, build_model, register

__all__ = ["MODELS", "build_model", "register"]
