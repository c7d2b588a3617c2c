"""What the load-test users send: a seeded stream of OpenAI requests with drawn prompt and output lengths.

Each request is a completion or a chat completion (``chat_share``), streamed or not (``stream_share``), with a
prompt of a drawn length and ``max_tokens`` drawn from the output distribution. Requests are sent with
``ignore_eos`` and temperature 0, so the server generates exactly ``max_tokens`` tokens and runs of the same
seed do the same work on every model. A prompt is shortened when prompt + output would not fit in
``max_model_len`` minus ``TEMPLATE_MARGIN`` (room for the chat template and re-tokenization at the window's
edges).
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass
from pathlib import Path

from loadtests.distributions import LengthDistribution
from loadtests.prompts import DEFAULT_PROMPT_FILE, PromptSource

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

    @classmethod
    def from_options(cls, options: argparse.Namespace, tokenizer_dir: Path | None) -> Workload:
        """The workload of the options added by add_workload_options (plus ``max_model_len``)."""
        return cls(prompts=PromptSource.from_files(Path(options.prompt_file), tokenizer_dir),
                   prompt_tokens=LengthDistribution.parse(options.prompt_tokens),
                   output_tokens=LengthDistribution.parse(options.output_tokens),
                   chat_share=options.chat_share, stream_share=options.stream_share,
                   max_model_len=options.max_model_len)

    def draw(self, rng: random.Random) -> Request:
        """The next request for a user whose generator is ``rng``."""
        chat = rng.random() < self.chat_share
        stream = rng.random() < self.stream_share
        room = self.max_model_len - TEMPLATE_MARGIN
        max_tokens = min(self.output_tokens.sample(rng), room - 1)
        prompt_length = min(self.prompt_tokens.sample(rng), room - max_tokens)
        return Request(chat, stream, self.prompts.prompt(rng, prompt_length), max_tokens)


WORKLOAD_OPTIONS = ("prompt_file", "prompt_tokens", "output_tokens", "chat_share", "stream_share", "seed")
"""Destinations of add_workload_options: the runner hands them on to Locust unchanged."""


def add_workload_options(parser: argparse.ArgumentParser) -> None:
    """The request options, shared by the locustfile's parser and the runner's."""
    parser.add_argument("--prompt-file", default=str(DEFAULT_PROMPT_FILE),
                        help="UTF-8 text prompts are cut from (default: the bundled Brown sample)")
    parser.add_argument("--prompt-tokens", default="uniform:32:256",
                        help="prompt length distribution: fixed:N, uniform:LO:HI, normal:MEAN:STD or "
                             "lognormal:MEDIAN:SIGMA (default uniform:32:256)")
    parser.add_argument("--output-tokens", default="uniform:16:128",
                        help="output length distribution, generated exactly (ignore_eos) (default uniform:16:128)")
    parser.add_argument("--chat-share", type=float, default=0.5, help="share of chat completions (default 0.5)")
    parser.add_argument("--stream-share", type=float, default=0.5, help="share of streamed requests (default 0.5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the request generators (default 0)")
