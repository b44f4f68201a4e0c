"""The public Python API: `llm = gyrfalcon.load(...)`, then `llm.generate`, `llm.stream`, `llm.logits`."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ModelConfig, load_config
from .models import build_model
from .quant.swap import load_into
from .runtime.generate import Generation
from .runtime.sampling import SamplingParams
from .text_stream import TextState
from .tokenizer import StreamDecoder, Tokenizer
from .weights import resolve_model_dir

ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_MODEL = ASSETS / "tiny-falcon-shakespeare"


@dataclass
class Completion:
    """One generated sequence."""

    text: str
    token_ids: list[int]
    finish_reason: str | None
    prompt_index: int = 0
    prompt_tokens: int = 0
    seed: int | None = None


@dataclass
class StreamEvent:
    """One streamed token: `text` is the new text it completes (may be empty while a character is split)."""

    text: str
    token_id: int
    index: int = 0
    finished: bool = False
    finish_reason: str | None = None


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    # On CPU, bf16/fp16 matrix-matrix products are orders of magnitude slower than fp32 here: compute in fp32.
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


class LLM:
    """A loaded model with its tokenizer. Build it with `gyrfalcon.load`."""

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, config: ModelConfig, path: Path):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.path = path

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def max_context(self) -> int | None:
        return getattr(self.config, "max_position_embeddings", None)

    @property
    def eos_token_ids(self) -> list[int]:
        ids = {self.tokenizer.eos_token_id, self.config.eos_token_id}
        return sorted(i for i in ids if i is not None)

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
            if not ids:
                raise ValueError("the prompt is empty: give at least one character")
            return ids
        ids = [int(t) for t in prompt]
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"token ids out of range [0, {self.config.vocab_size}): {bad[:5]}")
        return ids

    def chat_prompt(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)

    def _start(self, prompts, params: SamplingParams | None, kwargs: dict) -> tuple[Generation, list[list[int]]]:
        if params is None:
            params = SamplingParams(**kwargs)
        elif kwargs:
            raise TypeError("give either params= or keyword sampling arguments, not both")
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        ids = [self.encode(p) for p in prompts]
        return Generation(self.model, ids, params, self.eos_token_ids, self.max_context), ids

    def _text_states(self, gen: Generation, ids: list[list[int]]) -> dict[int, TextState]:
        n = gen.params.num_return_sequences
        return {s.index: TextState(StreamDecoder(self.tokenizer, ids[s.index // n]), gen.params.stop)
                for s in gen.sequences}

    @staticmethod
    def _events(gen: Generation, states: dict[int, TextState]) -> Iterator[list[StreamEvent]]:
        for events in gen:
            out = []
            for ev in events:
                # The rules of text_stream: EOS is not text; a stop string ends the sequence before the next step.
                text, finished, reason = states[ev.index].on_token(ev.token_id, ev.finished, ev.finish_reason)
                if finished and not ev.finished:
                    gen.finish(ev.index, "stop")
                ev.finished, ev.finish_reason = finished, reason
                out.append(StreamEvent(text, ev.token_id, ev.index, ev.finished, ev.finish_reason))
            yield out

    def stream_all(self, prompts, params: SamplingParams | None = None, **kwargs) -> Iterator[list[StreamEvent]]:
        """Stream several sequences at once: each step yields the events of that step."""
        gen, ids = self._start(prompts, params, kwargs)
        yield from self._events(gen, self._text_states(gen, ids))

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
               **kwargs) -> Iterator[StreamEvent]:
        """Token-by-token events for one prompt (one sequence per prompt unless num_return_sequences > 1)."""
        for events in self.stream_all(prompt, params, **kwargs):
            yield from events

    def generate(self, prompts, params: SamplingParams | None = None, **kwargs) -> list[Completion]:
        """Generate for one prompt or a list (strings or token-id lists). Returns one Completion per sequence,
        prompt-major (num_return_sequences per prompt). A stop string cuts the text; token_ids keep every
        generated token."""
        gen, ids = self._start(prompts, params, kwargs)
        states = self._text_states(gen, ids)
        for _ in self._events(gen, states):
            pass
        n = gen.params.num_return_sequences
        return [Completion(states[s.index].text, s.tokens, s.finish_reason, s.index // n, s.prompt_len, s.seed)
                for s in gen.sequences]

    def logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        """fp32 next-token logits [len, vocab] for every position of one sequence."""
        ids = torch.tensor([self.encode(list(token_ids))], device=self.device)
        with torch.inference_mode():
            return self.model(ids)[0].float()


def load(
    path_or_id: str | Path | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    revision: str | None = None,
    quantize: str | None = None,
    skip: Sequence[str] | str = (),
    adapter: str | Path | None = None,
) -> LLM:
    """Load a Falcon / Falcon-Mamba checkpoint from a local dir or a hub id (resolved through the HF cache).

    With no path the bundled tiny Shakespeare Falcon is loaded. Defaults: CUDA when available, else CPU;
    bf16 on GPU, fp32 on CPU (whatever dtype the checkpoint was saved in).

    quantize: "int8", "llm.int8", "nf4" or "fp4" quantizes the weights while they stream in (peak memory stays
    near the quantized size); `dtype` is then the compute dtype. skip: modules kept in full precision (names,
    suffixes such as "lm_head", or patterns). A checkpoint written by `gyrfalcon quantize` loads quantized with
    no flag. See `gyrfalcon.quant`.

    adapter: a LoRA adapter dir in PEFT's format (`gyrfalcon finetune`'s output, or peft's `save_pretrained`).
    Over a float base it is merged into the weights (full speed, same logits up to rounding); over a quantized
    base it stays a separate low-rank path, as it was trained (QLoRA). See `gyrfalcon.finetune`.
    """
    model_dir = resolve_model_dir(path_or_id if path_or_id is not None else DEFAULT_MODEL, revision=revision)
    config = load_config(model_dir)
    device = torch.device(device) if device is not None else default_device()
    dtype = parse_dtype(dtype) or default_dtype(device)
    tokenizer = Tokenizer.from_dir(model_dir)
    model = build_model(config)
    # Plain, quantizing while streaming, or a quantized checkpoint (recognized from its metadata).
    load_into(model, model_dir, dtype, device, quantize, skip)
    if adapter is not None:
        from .finetune import load_adapter, lora_modules, merge_lora
        from .quant import QuantLinear

        # fp32 matrices for a merge (the sum is rounded once, to the base's dtype); the compute dtype otherwise.
        quantized = any(isinstance(m, QuantLinear) for m in model.modules())
        load_adapter(model, adapter, dtype=None if quantized else torch.float32)
        if not any(isinstance(m.base, QuantLinear) for _, m in lora_modules(model)):
            merge_lora(model)
    model.eval()
    return LLM(model, tokenizer, config, model_dir)
