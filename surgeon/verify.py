"""Verification: run the same prompts through the source and the converted model and compare logits.

Both are loaded at the converted model's storage dtype and computed in fp32, so a dtype cast requested by the
user is not mistaken for a transform error; the difference left is what the transforms did.
"""

from __future__ import annotations

from pathlib import Path

import torch

PROMPTS = [
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs, and then tell me, "
    "in plain words, how the weather has been in the mountains this spring.",
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and arrows "
    "of outrageous fortune, or to take arms against a sea of troubles.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n\n"
    "for i in range(10):\n    print(i, fibonacci(i))\n",
]
PROMPT_TOKENS = 64
DEFAULT_TOLERANCE = 1e-5  # relative to max |logit|; identity inserts are exact in fp32, so this is generous


def _prompt_ids(model_dir: Path, vocab_size: int) -> torch.Tensor:
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        ids = [tok(p)["input_ids"][:PROMPT_TOKENS] for p in PROMPTS]
        length = min(len(i) for i in ids)
        if length >= 16 and max(max(i) for i in ids) < vocab_size:
            return torch.tensor([i[:length] for i in ids])
    except Exception:  # no tokenizer in the directory: fall back to fixed random ids
        pass
    return torch.randint(0, vocab_size, (len(PROMPTS), PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))


def load_fp32(path: Path, dtype: torch.dtype | None = None):
    """Load a model at `dtype` (default: as stored), then compute in fp32."""
    import surgeon.modeling  # noqa: F401  (registers the surgeon families)
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()  # our own progress is on screen; the loader's bars would interleave
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto")
    return model.float().eval()


@torch.no_grad()
def compare_logits(source: Path, converted: Path, *, dtype: torch.dtype | None = None,
                   tolerance: float | None = None) -> dict:
    out_model = load_fp32(converted)
    src_model = load_fp32(source, dtype)
    ids = _prompt_ids(source, src_model.config.vocab_size)
    a = src_model(input_ids=ids).logits
    b = out_model(input_ids=ids).logits
    diff = (a - b).abs().max().item()
    scale = a.abs().max().item() or 1.0
    tol = DEFAULT_TOLERANCE if tolerance is None else tolerance
    return {"max_abs_diff": diff, "max_rel_diff": diff / scale, "tolerance": tol, "ok": diff / scale <= tol,
            "prompts": int(ids.shape[0]), "tokens": int(ids.numel())}
