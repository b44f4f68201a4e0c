"""Training: data windows, one reusable loop (pretraining now, fine-tuning later), and `gyrfalcon train`."""

from .data import RandomWindows, eval_windows, split_tokens, tokenize_file
from .loop import TrainConfig, TrainResult, causal_lm_loss, evaluate, load_checkpoint, train

__all__ = [
    "RandomWindows",
    "TrainConfig",
    "TrainResult",
    "causal_lm_loss",
    "eval_windows",
    "evaluate",
    "load_checkpoint",
    "split_tokens",
    "tokenize_file",
    "train",
]
