"""Prompts of a chosen length cut from a local text file.

With the model's ``tokenizer.json`` the text is tokenized once and a prompt of N tokens is a random window of
N token ids, decoded back to text (re-tokenizing that text gives N tokens give or take a few at the window's
edges). Without a tokenizer, a window of N whitespace-separated words is used instead. The default text is the
Brown-corpus sample shipped with the package (``offline/data/brown-calibration-sample.txt``); nothing is
downloaded.
"""

from __future__ import annotations

import random
from pathlib import Path

DEFAULT_PROMPT_FILE = Path(__file__).resolve().parents[1] / "offline" / "data" / "brown-calibration-sample.txt"


class PromptSource:
    """Random windows of a text, measured in tokens (with a tokenizer) or words (without)."""

    def __init__(self, text: str, tokenizer_file: Path | None = None):
        if tokenizer_file is not None:
            from tokenizers import Tokenizer

            self._tokenizer = Tokenizer.from_file(str(tokenizer_file))
            self._units = self._tokenizer.encode(text, add_special_tokens=False).ids
        else:
            self._tokenizer = None
            self._units = text.split()
        if not self._units:
            raise ValueError("the prompt text is empty")

    @classmethod
    def from_files(cls, prompt_file: Path, model_dir: Path | None) -> PromptSource:
        """Text from ``prompt_file``; tokens of ``model_dir/tokenizer.json`` when that file exists, else words."""
        tokenizer_file = Path(model_dir) / "tokenizer.json" if model_dir else None
        if tokenizer_file is not None and not tokenizer_file.is_file():
            tokenizer_file = None
        return cls(Path(prompt_file).read_text(encoding="utf-8"), tokenizer_file)

    @property
    def counts_tokens(self) -> bool:
        return self._tokenizer is not None

    def __len__(self) -> int:
        return len(self._units)

    def prompt(self, rng: random.Random, length: int) -> str:
        """A random window of ``length`` units (capped at the text's length)."""
        length = max(1, min(length, len(self._units)))
        start = rng.randrange(len(self._units) - length + 1)
        window = self._units[start:start + length]
        return self._tokenizer.decode(window) if self._tokenizer is not None else " ".join(window)
