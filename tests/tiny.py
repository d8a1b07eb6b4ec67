"""Tiny random checkpoints of every supported family, built in-process (no downloads)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")
ALL_FAMILIES = FAMILIES + MOE_FAMILIES
VOCAB = 128
# a few small experts, top-2 routing (the families' defaults are 8-60 experts of 1-5k)
MOE_KWARGS = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=40),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
}


def tiny_config(family: str, tied: bool = False, **overrides):
    kwargs = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128,
                  tie_word_embeddings=tied, head_dim=12, **MOE_KWARGS.get(family, {}))
    kwargs.update(overrides)
    config = AutoConfig.for_model(family, **kwargs)
    # a family whose default special tokens lie past the tiny vocabulary (SmolLM3's 128000…) gets the tiny
    # tokenizer's, which the others already have (or none)
    for key, tiny_id in (("pad_token_id", None), ("bos_token_id", 1), ("eos_token_id", 2)):
        value = getattr(config, key, None)
        if key not in overrides and isinstance(value, int) and value >= VOCAB:
            setattr(config, key, tiny_id)
    return config


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "<s>", "</s>"] + [chr(c) for c in range(33, 33 + VOCAB - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def make_tiny(path: Path, family: str = "llama", tied: bool = False, *, seed: int = 0,
              tokenizer: bool = True, config_overrides: dict | None = None, **save_kwargs) -> Path:
    """A random model whose norm weights are not all ones (so a wrong λ rewrite shows in the logits).
    MoE families are written as transformers 5 writes them: one tensor per expert."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, tied, **(config_overrides or {})))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    model.save_pretrained(path, **save_kwargs)
    if tokenizer:
        tiny_tokenizer().save_pretrained(path)
    return Path(path)


def input_ids(batch: int = 2, length: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(path: Path, ids: torch.Tensor | None = None, dtype=torch.float32) -> torch.Tensor:
    import surgeon.modeling  # noqa: F401  (registers the surgeon_* families)

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    return model(input_ids=input_ids() if ids is None else ids).logits.float()


# Prepended to a subprocess script: makes surgeon unimportable, as on a machine with only torch + transformers.
HIDE_SURGEON = textwrap.dedent("""
    import importlib.abc, sys
    class HideSurgeon(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "surgeon" or name.startswith("surgeon."):
                raise ImportError("surgeon is not installed here")
    sys.meta_path.insert(0, HideSurgeon())
""")


WORDS = "the quick brown fox jumps over lazy dog and runs far away into wild green hills".split()


def write_words(path, lines: int, seed: int = 0, words_per_line: int = 12):
    """A text file of `lines` lines of random WORDS (seeded): a training corpus for tiny models."""
    import random

    rng = random.Random(seed)
    path.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(words_per_line)) for _ in range(lines)))
    return path
