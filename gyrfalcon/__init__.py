"""gyrfalcon: run, serve, quantize, fine-tune and evaluate Falcon models natively in PyTorch.

    import gyrfalcon
    llm = gyrfalcon.load()                      # the bundled tiny Shakespeare Falcon
    print(llm.generate("ROMEO:", max_new_tokens=40, temperature=0.8)[0].text)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["LLM", "Completion", "SamplingParams", "StreamEvent", "load"]

if TYPE_CHECKING:
    from .api import LLM, Completion, StreamEvent, load
    from .runtime.sampling import SamplingParams


def __getattr__(name: str):
    # Imported lazily so that `import gyrfalcon` (and `gyrfalcon --help`) stays fast: torch loads on first use.
    if name in ("LLM", "Completion", "StreamEvent", "load"):
        from . import api

        return getattr(api, name)
    if name == "SamplingParams":
        from .runtime.sampling import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'gyrfalcon' has no attribute {name!r}")
