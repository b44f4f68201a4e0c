"""Checkpoint I/O: find a model directory (local or hub cache), stream its weights into a meta-device model, save.

    from gyrfalcon.config import load_config
    from gyrfalcon.models import build_model
    from gyrfalcon.weights import load_weights, resolve_model_dir

    model_dir = resolve_model_dir("tiiuae/falcon-7b")
    model = build_model(load_config(model_dir))          # meta device: no memory yet
    load_weights(model, model_dir, torch.bfloat16, "cuda")
"""

from .hub import WeightsError, resolve_model_dir
from .load import CheckpointFiles, find_checkpoint, load_weights, read_safetensors_header, save_weights

__all__ = [
    "CheckpointFiles",
    "WeightsError",
    "find_checkpoint",
    "load_weights",
    "read_safetensors_header",
    "resolve_model_dir",
    "save_weights",
]
