"""gyrfalcon as an lm-evaluation-harness model, registered as `gyrfalcon`.

    import gyrfalcon.eval.harness  # registers the model
    import lm_eval
    lm_eval.simple_evaluate(model="gyrfalcon", model_args="pretrained=tiiuae/falcon-7b,dtype=bf16", tasks=[...])

or, with an already loaded model, `GyrfalconLM(llm=gyrfalcon.load(...))`. Loglikelihoods run through the same
`Scorer` as `gyrfalcon eval` (lm-eval hands over token ids it split itself; contexts that start with the same 64
tokens are grouped so that shared few-shot prefixes run once), rolling loglikelihoods through its disjoint windows,
and generation through `LLM.generate`. Needs `pip install lm-eval`.
"""

from __future__ import annotations

from typing import Any

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from .runner import DEFAULT_BATCH_SIZE
from .scoring import Request, Scorer
from .tasks.perplexity import windows

# Contexts whose first GROUP_KEY_TOKENS tokens agree are offered to the scorer as one prefix-sharing group.
GROUP_KEY_TOKENS = 64
DEFAULT_MAX_GEN_TOKS = 256


def _progress(total: int, disable: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, unit="tok", unit_scale=True, disable=disable, desc=desc)


@register_model("gyrfalcon")
class GyrfalconLM(TemplateLM):
    def __init__(self, pretrained: str | None = None, device: str | None = None, dtype: str | None = None,
                 revision: str | None = None, batch_size: int | str = DEFAULT_BATCH_SIZE,
                 max_length: int | None = None, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, llm=None,
                 **kwargs: Any):
        super().__init__()
        if llm is None:
            from ..api import load

            llm = load(pretrained, device=device, dtype=dtype, revision=revision, **kwargs)
        elif kwargs:
            raise TypeError(f"unexpected arguments with llm=: {sorted(kwargs)}")
        self.llm = llm
        self.tokenizer = llm.tokenizer
        bs = DEFAULT_BATCH_SIZE if str(batch_size).startswith("auto") else int(batch_size)
        self.scorer = Scorer.for_llm(llm, batch_size=bs, max_length=max_length)
        self.batch_size = bs
        self._max_gen_toks = int(max_gen_toks)

    # -- what lm-eval asks of a model ----------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.scorer.prefix_token_id

    @property
    def max_length(self) -> int:
        return self.scorer.max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def device(self):
        return self.llm.device

    @property
    def tokenizer_name(self) -> str:
        return str(self.llm.path).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.llm.tokenizer.encode(string, add_special_tokens=True if add_special_tokens is None
                                         else add_special_tokens)

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.llm.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.llm.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        reqs = [Request(tuple(ctx), tuple(cont), tuple(ctx[:GROUP_KEY_TOKENS]) if len(ctx) > GROUP_KEY_TOKENS
                        else None) for _, ctx, cont in requests]
        plan = self.scorer.plan(reqs)
        bar = _progress(plan.tokens, disable_tqdm, "gyrfalcon loglikelihood")
        try:
            out = self.scorer.run(plan, bar.update)
        finally:
            bar.close()
        for (key, _, _), res in zip(requests, out, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        all_reqs, owner = [], []
        for i, req in enumerate(requests):
            (text,) = req.args
            ws = windows(self.tok_encode(text), self.eot_token_id, self.max_length, self.max_length)
            all_reqs += ws
            owner += [i] * len(ws)
        sums = [0.0] * len(requests)
        plan = self.scorer.plan(all_reqs)
        bar = _progress(plan.tokens, disable_tqdm, "gyrfalcon rolling loglikelihood")
        try:
            for i, (ll, _) in zip(owner, self.scorer.run(plan, bar.update), strict=True):
                sums[i] += ll
        finally:
            bar.close()
        for req, s in zip(requests, sums, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, s)
        return sums

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from tqdm import tqdm

        from ..runtime.sampling import SamplingParams

        eos = self.llm.tokenizer.decode([self.eot_token_id], skip_special_tokens=False)
        jobs: dict[SamplingParams, list[tuple[int, list[int]]]] = {}
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            kw = dict(gen_kwargs or {})
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            if eos not in until:
                until.append(eos)
            max_new = int(kw.pop("max_gen_toks", self.max_gen_toks))
            do_sample = bool(kw.pop("do_sample", False))
            temperature = float(kw.pop("temperature", 0.0)) if do_sample else 0.0
            params = SamplingParams(max_new_tokens=max_new, temperature=temperature,
                                    top_p=float(kw.pop("top_p", 1.0)) if do_sample else 1.0,
                                    top_k=int(kw.pop("top_k", 0)) if do_sample else 0,
                                    stop=tuple(u for u in until if u), seed=0 if do_sample else None)
            keep = max(1, self.max_length - max_new)
            jobs.setdefault(params, []).append((i, self.tok_encode(context)[-keep:]))
        out: list[str] = [""] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="gyrfalcon generate_until")
        for params, items in jobs.items():
            items.sort(key=lambda t: -len(t[1]))
            for s in range(0, len(items), self.batch_size):
                batch = items[s : s + self.batch_size]
                for (i, _), c in zip(batch, self.llm.generate([ids for _, ids in batch], params), strict=True):
                    out[i] = c.text
                    self.cache_hook.add_partial("generate_until", requests[i].args, c.text)
                bar.update(len(batch))
        bar.close()
        return out
