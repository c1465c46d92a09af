"""Compatibility with the outside world: safe checkpoint loading and the official LAPS release."""

from laps.compat.official import (
    OfficialCheckpoint,
    build_official_model,
    load_head_state_dict,
    load_official_checkpoint,
    load_official_state_dict,
    model_from_official,
    official_hparams,
    read_official_checkpoint,
)
from laps.compat.serialization import ALLOWED_GLOBALS, UnsafeCheckpointError, safe_load

__all__ = [
    "ALLOWED_GLOBALS",
    "OfficialCheckpoint",
    "UnsafeCheckpointError",
    "build_official_model",
    "load_head_state_dict",
    "load_official_checkpoint",
    "load_official_state_dict",
    "model_from_official",
    "official_hparams",
    "read_official_checkpoint",
    "safe_load",
]
