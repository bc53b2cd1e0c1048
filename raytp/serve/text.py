"""Text of a checkpoint: its tokenizer (``tokenizer.json``, read with the ``tokenizers``
package), its end-of-sequence ids, and the text of a completion as its ids arrive, cut
at the first stop string.

:class:`CompletionText` decodes all the ids so far at every new id and hands out what
was not handed out yet, holding back a tail that could still become a stop string (or
is an unfinished UTF-8 character, decoded as U+FFFD); the pieces put together are the
decoded ids, cut before the first stop string.
"""

from __future__ import annotations

from pathlib import Path

from raytp.checkpoint.files import read_json


def load_tokenizer(path: str | Path):
    """The ``tokenizers.Tokenizer`` of ``path/tokenizer.json``; None when there is none."""
    file = Path(path) / "tokenizer.json"
    if not file.is_file():
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError as e:
        raise ImportError(f"{file} needs the 'tokenizers' package: pip install tokenizers") from e
    return Tokenizer.from_file(str(file))


def eos_ids(path: str | Path, vocab_size: int) -> tuple[int, ...]:
    """The ``eos_token_id`` (an id or a list) of ``path/config.json``, those in the vocabulary."""
    file = Path(path) / "config.json"
    eos = read_json(file).get("eos_token_id") if file.is_file() else None
    eos = [eos] if isinstance(eos, int) else eos if isinstance(eos, list) else []
    return tuple(t for t in eos if isinstance(t, int) and 0 <= t < vocab_size)


class CompletionText:
    """One choice's text as ids arrive (see the module docstring); ``tokenizer`` None:
    no text, ids only. ``stopped`` once a stop string was reached."""

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.sent = 0  # characters of the text handed out
        self.text = ""  # the decoded ids, cut at a stop string once one is reached
        self.stopped = False
        self._hold = max(map(len, stop), default=1) - 1

    def add(self, token: int) -> str:
        """Take the next id; the text that can be handed out now."""
        self.ids.append(token)
        if self.tokenizer is None:
            return ""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s, max(0, self.sent - len(s))) for s in self.stop) if i >= 0),
                  default=-1)
        if cut >= 0:
            self.text, self.stopped = text[:cut], True
            return self._take(cut)
        self.text = text
        safe = len(text) - self._hold
        while safe > self.sent and text[safe - 1] == "\ufffd":
            safe -= 1
        return self._take(safe)

    def finish(self) -> str:
        """The completion ended: the text held back."""
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        if end <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent:end], end
        return piece
