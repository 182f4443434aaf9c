"""A request's prompt as prefix-aware routing reads it: as text (approximate) or as the engine's tokens
(precise), each cut into the chained blocks of `raylm.serving.prefix_index`."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from raylm.serving.prefix_index import chain_keys, digest, token_blocks

logger = logging.getLogger("raylm.router")

TEXT_BLOCK_CHARS = 128  # a block of the approximate index
TEXT_BLOCK_TOKENS = 32  # about as many tokens


def prompt_text(request: dict[str, Any]) -> str:
    """The text a request's prompt is made of, in order: `prompt` (completions), else each message's role
    and text (chat); empty when there is none (embeddings of token ids, ...)."""
    prompt = request.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        return prompt[0]  # a batch of prompts: the first one's replica serves them all
    parts = []
    for message in request.get("messages") or ():
        if not isinstance(message, dict):
            continue
        parts.append(f"<{message.get('role')}>")
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts += [part.get("text", "") for part in content if isinstance(part, dict)]
    return "\n".join(parts)


def text_prefix(request: dict[str, Any]) -> list[int]:
    """The approximate prefix: the prompt's text in blocks of TEXT_BLOCK_CHARS, under its model's name."""
    text = prompt_text(request)
    blocks = [
        digest(text[i : i + TEXT_BLOCK_CHARS]) for i in range(0, len(text) - TEXT_BLOCK_CHARS + 1, TEXT_BLOCK_CHARS)
    ]
    return chain_keys(blocks, root=("text", request.get("model")))


class Tokenizing:
    """The engine's tokens for a request, from the model's own tokenizer and chat template (a fast tokenizer,
    as the engines use), loaded once in the background from the start: importing transformers and loading
    take seconds, which no request waits for (until then, `ready` is False)."""

    def __init__(self, model_path: str | None):
        self.model_path = model_path
        self.tokenizer: Any = None
        if model_path is not None:
            threading.Thread(target=self._load, name="raylm-tokenizer", daemon=True).start()

    def _load(self) -> None:
        try:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        except Exception as exc:  # the router serves on, reading prompts approximately: say so once
            logger.error("no tokenizer loaded from %s (%s): prompts are routed approximately", self.model_path, exc)

    @property
    def ready(self) -> bool:
        return self.tokenizer is not None

    def tokens(self, request: dict[str, Any]) -> list[int]:
        """As vLLM makes them: a completion's prompt with the tokenizer's special tokens; a chat's messages
        through the chat template (with the generation prompt), then tokenized without adding any."""
        prompt = request.get("prompt")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            return prompt  # token ids already
        if prompt is not None:
            return self.tokenizer(prompt_text(request)).input_ids
        messages = request.get("messages")
        if not isinstance(messages, list):
            return []
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False).input_ids


def token_prefix(tokenizing: Tokenizing, block_size: Callable[[], int | None]) -> Callable[[dict], list[int]]:
    """The precise prefix of a request: its tokens in the engine's blocks (the size the engine's events
    said); None while no event said it or the tokenizer is not loaded (the caller falls back to the
    approximate prefix)."""

    def prefix(request: dict[str, Any]) -> list[int] | None:
        size = block_size()
        if size is None or not tokenizing.ready:
            return None
        try:
            tokens = tokenizing.tokens(request)
        except Exception as exc:  # a request the template refuses: the engine says why, not the router
            logger.debug("not tokenized: %s", exc)
            return []
        return chain_keys(token_blocks(tokens, size))

    return prefix
