"""gyrfalcon: run, serve, quantize, fine-tune and evaluate Falcon models natively in PyTorch."""

__version__ = "0.1.0"
