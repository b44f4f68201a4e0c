"""Fine-tuning: LoRA / QLoRA adapters as a module swap, saved and loaded in PEFT's format, merged into the base.

    from gyrfalcon.finetune import LoraConfig, apply_lora, save_adapter, load_adapter, merge_lora
    apply_lora(llm.model, LoraConfig(r=16, alpha=32))   # Falcon: query_key_value, dense, dense_h_to_4h, dense_4h_to_h
    ...train...                                         # only the adapters require grad
    save_adapter(llm.model, None, "out/")               # adapter_config.json + adapter_model.safetensors
    llm = gyrfalcon.load(base, adapter="out/")          # or peft's PeftModel.from_pretrained(hf_model, "out/")

lora.py: the config, the module and the swap. peft_io.py: PEFT's file format. merge.py: folding adapters into
(float or quantized) base weights and `gyrfalcon merge`.
"""

from .lora import (
    FALCON_MAMBA_TARGETS,
    FALCON_TARGETS,
    LoraConfig,
    LoraError,
    LoraLinear,
    apply_lora,
    default_targets,
    lora_config_of,
    lora_modules,
    lora_parameters,
)
from .merge import merge_checkpoint, merge_lora
from .peft_io import AdapterError, load_adapter, lora_state_dict, read_adapter_config, save_adapter

__all__ = [
    "FALCON_MAMBA_TARGETS",
    "FALCON_TARGETS",
    "AdapterError",
    "LoraConfig",
    "LoraError",
    "LoraLinear",
    "apply_lora",
    "default_targets",
    "load_adapter",
    "lora_config_of",
    "lora_modules",
    "lora_parameters",
    "lora_state_dict",
    "merge_checkpoint",
    "merge_lora",
    "read_adapter_config",
    "save_adapter",
]
