"""pqae: Point-PQAE models and the shared mechanics of the task scripts."""

from pqae.classifier import PointClassifier
from pqae.model import PointEncoder, PointPQAE

__all__ = ["PointClassifier", "PointEncoder", "PointPQAE"]
