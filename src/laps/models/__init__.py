"""The model library: backbones, encoders, the slimming head and the model object. Knows nothing about training."""

from laps.models.backbones import BACKBONES, BackboneSpec, get_backbone
from laps.models.dual_encoder import DualEncoder
from laps.models.encoders import HFVisionEncoder, TextEncoder, TimmVisionEncoder, VisionEncoder
from laps.models.factory import create_model
from laps.models.head import LAPSHead
from laps.models.laps_model import LAPSModel

__all__ = [
    "BACKBONES", "BackboneSpec", "DualEncoder", "HFVisionEncoder", "LAPSHead", "LAPSModel", "TextEncoder",
    "TimmVisionEncoder", "VisionEncoder", "create_model", "get_backbone",
]
