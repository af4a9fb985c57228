"""Res2Net ImageNet training and evaluation recipe (Gao et al., TPAMI 2021)."""

__all__ = ["Predictor", "create_model", "list_models", "load_pretrained", "predict", "prepare_for_inference"]


def __getattr__(name: str):
    # Imported on first use, so `res2net.files` and the data scripts load without torch.
    if name in ("Predictor", "predict"):
        from . import predictor

        return getattr(predictor, name)
    if name in __all__:
        from . import models

        return getattr(models, name)
    raise AttributeError(f"module 'res2net' has no attribute {name!r}")
