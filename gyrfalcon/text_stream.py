"""Token ids -> text, one token at a time, with stop strings: the one set of rules that `LLM.generate` /
`LLM.stream` (api.py) and the server (server/serving.py) both apply, so that a request's text is the same
through either.

The rules:
* text is decoded incrementally (`StreamDecoder`: never half a UTF-8 character);
* an EOS token ends the sequence but is not part of its text;
* a stop string ends the sequence before the next step; the text is cut where the stop string begins, and the
  characters that could still become a stop string are held back until they cannot.
"""

from __future__ import annotations

from dataclasses import dataclass

from .tokenizer import StreamDecoder


@dataclass
class TextState:
    """Incremental text of one sequence, with stop strings held back until they cannot match any more."""

    decoder: StreamDecoder
    stops: tuple[str, ...]
    text: str = ""
    emitted: int = 0
    stopped: bool = False

    def push(self, token_id: int | None, final: bool) -> str:
        """Add a token (None: none, e.g. at the end) and return the text that may now be shown."""
        if token_id is not None:
            self.text += self.decoder.push(token_id)
        if final:
            self.text += self.decoder.flush()
        for stop in self.stops:
            at = self.text.find(stop, max(0, self.emitted - len(stop)))
            if at != -1:
                self.text = self.text[:at]
                self.stopped = True
        end = len(self.text)
        if not (final or self.stopped):
            end -= self._held_back()
        end = max(end, self.emitted)
        out = self.text[self.emitted : end]
        self.emitted = end
        return out

    def on_token(self, token_id: int, finished: bool, finish_reason: str | None) -> tuple[str, bool, str | None]:
        """Apply the rules to one generated token: returns (new text, finished, finish_reason). When a stop string
        was just reached, (..., True, "stop") comes back for a sequence the engine still runs: the caller must end
        it (`finish(index, "stop")`) before the next step."""
        text = self.push(None if finish_reason == "eos" else token_id, final=finished)
        if self.stopped and not finished:
            return text + self.push(None, final=True), True, "stop"
        return text, finished, finish_reason

    def _held_back(self) -> int:
        """Characters at the end of the text that could be the start of a stop string."""
        hold = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.text)), hold, -1):
                if self.text.endswith(stop[:n]):
                    hold = n
                    break
        return hold
