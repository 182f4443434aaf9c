"""Tiny real models built offline, for demos, tests and benchmarks.

`build_tiny_llama` writes a Llama-architecture model with random weights and a
byte-level BPE tokenizer trained on a few sentences: every engine loads it like
any Hugging Face checkpoint, its text is gibberish. Needs `transformers` and
`tokenizers` (installed with any engine). Run as a script::

    python -m raylm.testing.models /tmp/tiny-llama
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SENTENCES = [
    "Hello world, this is a tiny model for raylm.",
    "The quick brown fox jumps over the lazy dog.",
    "Ray Serve runs replicas of a deployment on a cluster.",
    "A cat sits on the mat and looks at the sun.",
    "Large language models answer questions one token at a time.",
    "The stock market fell sharply on Monday morning.",
]
# vLLM arguments that fit the tiny Llama on a CPU-only machine, for tests. Optimization level 0
# skips torch.compile: a start takes ~20 s less here, and nothing raylm does depends on it.
TINY_LLAMA_VLLM_ARGS = {
    "max_model_len": 512,
    "dtype": "float32",
    "kv_cache_memory_bytes": 128 * 2**20,
    "optimization_level": 0,
}
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def build_tiny_llama(path: str | Path, *, hidden_size: int = 128, layers: int = 2, seed: int = 0) -> Path:
    """Write the tiny model to `path` (idempotent: an existing complete model is kept)."""
    path = Path(path)
    if (path / "config.json").exists() and (path / "tokenizer.json").exists():
        return path
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(SENTENCES, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )
    fast.chat_template = CHAT_TEMPLATE

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=hidden_size // 64,  # head size 64: vLLM's CPU attention rejects smaller ones
        num_key_value_heads=hidden_size // 64,
        max_position_embeddings=512,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    staging = path.with_name(path.name + ".partial")
    model.save_pretrained(staging)
    fast.save_pretrained(staging)
    (staging / "raylm-tiny.json").write_text(json.dumps({"built_by": "raylm.testing.models", "seed": seed}))
    staging.rename(path)
    return path


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m raylm.testing.models DIRECTORY")
    print(build_tiny_llama(sys.argv[1]))
