"""pqae: Point-PQAE models and the shared mechanics of the task scripts.

The names below are imported on first use, so that `python -m pqae.doctor` runs where only
torch and Triton are installed (a broken install still gets its report)."""

_LAZY = {"PointClassifier": "pqae.classifier", "PointEmbedder": "pqae.embed",
         "load_encoder": "pqae.embed", "PointEncoder": "pqae.model", "PointPQAE": "pqae.model"}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pqae' has no attribute {name!r}")
