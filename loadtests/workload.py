"""What the load-test users send: a seeded stream of OpenAI requests with drawn prompt and output lengths.

Each request is a completion or a chat completion (``chat_share``), streamed or not (``stream_share``), with a
prompt of a drawn length and ``max_tokens`` drawn from the output distribution. Requests are sent with
``ignore_eos`` and temperature 0, so the server generates exactly ``max_tokens`` tokens and runs of the same
seed do the same work on every model. A prompt is shortened when prompt + output would not fit in
``max_model_len`` minus ``TEMPLATE_MARGIN`` (room for the chat template and re-tokenization at the window's
edges).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from loadtests.distributions import LengthDistribution
from loadtests.prompts import PromptSource

TEMPLATE_MARGIN = 32
"""Tokens kept free of prompt and output in the context: chat template plus window-edge re-tokenization."""


@dataclass(frozen=True)
class Request:
    chat: bool
    stream: bool
    prompt: str
    max_tokens: int

    @property
    def kind(self) -> str:
        """completions, completions-stream, chat or chat-stream."""
        return ("chat" if self.chat else "completions") + ("-stream" if self.stream else "")


@dataclass(frozen=True)
class Workload:
    prompts: PromptSource
    prompt_tokens: LengthDistribution
    output_tokens: LengthDistribution
    chat_share: float
    stream_share: float
    max_model_len: int

    def __post_init__(self):
        for name in ("chat_share", "stream_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        if self.max_model_len <= TEMPLATE_MARGIN + 1:
            raise ValueError(f"max_model_len must exceed {TEMPLATE_MARGIN + 1}")

    def draw(self, rng: random.Random) -> Request:
        """The next request for a user whose generator is ``rng``."""
        chat = rng.random() < self.chat_share
        stream = rng.random() < self.stream_share
        room = self.max_model_len - TEMPLATE_MARGIN
        max_tokens = min(self.output_tokens.sample(rng), room - 1)
        prompt_length = min(self.prompt_tokens.sample(rng), room - max_tokens)
        return Request(chat, stream, self.prompts.prompt(rng, prompt_length), max_tokens)
