"""pqae: Point-PQAE models and the shared mechanics of the task scripts."""

from pqae.classifier import PointClassifier
from pqae.embed import PointEmbedder, load_encoder
from pqae.model import PointEncoder, PointPQAE

__all__ = ["PointClassifier", "PointEmbedder", "PointEncoder", "PointPQAE", "load_encoder"]
