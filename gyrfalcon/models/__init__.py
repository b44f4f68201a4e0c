"""Model families. `build_model` picks the family from the normalized config."""

from __future__ import annotations

import torch
from torch import nn

from ..config import FalconConfig, FalconMambaConfig, ModelConfig


def build_model(
    config: ModelConfig, device: torch.device | str = "meta", dtype: torch.dtype | None = None
) -> nn.Module:
    """Construct the model for `config`; on the meta device (the default) no memory is allocated, so the weights
    can be streamed in with `load_state_dict(assign=True)`."""
    if isinstance(config, FalconConfig):
        from .falcon import FalconForCausalLM as cls
    elif isinstance(config, FalconMambaConfig):
        from .falcon_mamba import FalconMambaForCausalLM as cls
    else:
        raise TypeError(f"no model family for {type(config).__name__}")
    with torch.device(device):
        model = cls(config)
    if dtype is not None:
        model.to(dtype)
    return model
