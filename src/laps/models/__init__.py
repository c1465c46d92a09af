"""The model library: encoders, the slimming head and the model object. Knows nothing about training."""

from laps.models.encoders import HFVisionEncoder, TextEncoder, TimmVisionEncoder, VisionEncoder
from laps.models.head import LAPSHead
from laps.models.laps_model import LAPSModel

__all__ = ["HFVisionEncoder", "LAPSHead", "LAPSModel", "TextEncoder", "TimmVisionEncoder", "VisionEncoder"]
