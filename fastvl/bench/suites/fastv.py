"""FastV case (op ``fastv``): prefill of a LLaMA-shaped decoder holding 576 image tokens.

A ``transformers`` ``LlamaModel`` (random init, built from a ``LlamaConfig``; the decoder
without the LM head, whose prefill cost in ``generate`` is one token's) prefills one prompt of
35 text tokens, 576 image tokens (LLaVA-1.5's 24 x 24 grid) and 29 text tokens, building its
KV cache, as the first step of ``generate`` does. Latency, and on CUDA the peak memory of the
call (activations and cache, beyond the weights). Implementations (three copies of the same
weights):

* ``sdpa``: ``attn_implementation="sdpa"`` (the baseline);
* ``fastvl``: ``attn_implementation="fastvl"`` (:func:`fastvl.patch.transformers.register`);
* ``fastvl FastV``: that, plus :func:`fastvl.patch.transformers.apply_fastv` dropping half of
  the image tokens after layer 2 (ranked by the attention of the last token), the image
  tokens passed as ``image_token_mask``.

Checks: ``fastvl`` must match ``sdpa`` on every hidden state. FastV returns the kept tokens
only (its output is shorter, and every token after the image attends to fewer tokens), so it
is checked on what pruning must not change: the output has the expected number of tokens, and
the text tokens before the image (which never attend to image tokens; kept, at their original
positions) match ``sdpa``'s.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch

from fastvl.bench.cases import FORWARD, Built, Scale, register_case, requires_module
from fastvl.bench.suites.attention import TOLERANCES

BASELINE = "sdpa"
IMPLS = (BASELINE, "fastvl", "fastvl FastV")
IMAGE_TOKENS, TEXT_BEFORE, TEXT_AFTER = 576, 35, 29
FASTV_LAYER, FASTV_KEEP_RATIO = 2, 0.5
# (hidden, heads, kv heads, intermediate, layers, vocab) per scale: 7B-like widths on GPUs
# (8 of the 32 layers, so the model initialises in seconds), a scaled-down one on CPUs.
CONFIGS = {
    "full": (4096, 32, 8, 11008, 8, 32000),
    "cpu": (512, 8, 2, 1408, 4, 32000),
    "quick": (64, 4, 2, 176, 4, 1000),
}


def _decoder(device, dtype, scale: Scale):
    from transformers import LlamaConfig, LlamaModel

    hidden, heads, kv_heads, intermediate, layers, vocab = CONFIGS.get(scale.name, CONFIGS["cpu"])
    config = LlamaConfig(
        hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv_heads,
        intermediate_size=intermediate, num_hidden_layers=layers, vocab_size=vocab,
        max_position_embeddings=4096, pad_token_id=0, eos_token_id=None, bos_token_id=None,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaModel._from_config(config, attn_implementation="sdpa", dtype=dtype)
    return model.eval()


def _check_fastv(
    actual, expected, kept_tokens: int, text_before: int, rtol: float, atol: float
) -> Optional[str]:
    """FastV's hidden states (1, N', C) vs the unpruned model's (1, N, C) (see module)."""
    if actual.shape[1] != kept_tokens:
        return f"{actual.shape[1]} tokens left after pruning, expected {kept_tokens}"
    try:
        torch.testing.assert_close(
            actual[:, :text_before], expected[:, :text_before], rtol=rtol, atol=atol
        )
    except AssertionError as exc:
        return "the text tokens before the image differ: " + " ".join(
            str(exc).strip().splitlines()[:3]
        )
    return None


def _build_prefill(device, dtype, scale: Scale, mode: str) -> Built:
    import fastvl.patch.transformers as fastvl_hf

    image_tokens = scale.size(IMAGE_TOKENS)
    before, after = scale.size(TEXT_BEFORE), scale.size(TEXT_AFTER)
    tokens = before + image_tokens + after
    model = _decoder(device, dtype, scale)
    generator = torch.Generator(device=device).manual_seed(0)
    input_ids = torch.randint(
        1, model.config.vocab_size, (1, tokens), generator=generator, device=device
    )
    image_mask = torch.zeros(1, tokens, dtype=torch.bool, device=device)
    image_mask[:, before:before + image_tokens] = True
    rtol, atol = TOLERANCES[dtype]
    built = Built(
        shapes={"input_ids": [1, tokens], "image_tokens": [before, before + image_tokens],
                "hidden": model.config.hidden_size, "layers": model.config.num_hidden_layers,
                "heads": [model.config.num_attention_heads, model.config.num_key_value_heads],
                "fastv": {"layer": FASTV_LAYER, "keep_ratio": FASTV_KEEP_RATIO}},
        items=1,
        track_memory=True,
        rtol=rtol,
        atol=atol,
    )

    def prefill(decoder, **kwargs):
        def run():
            with torch.inference_mode():
                return decoder(input_ids, use_cache=True, **kwargs).last_hidden_state

        return run

    built.add(BASELINE, prefill(model))
    fastvl_hf.register()
    with_fastvl = copy.deepcopy(model)
    with_fastvl.set_attn_implementation(fastvl_hf.ATTN_IMPLEMENTATION)
    built.add("fastvl", prefill(with_fastvl))
    try:
        from fastvl.patch.fastv import apply_fastv, keep_count
    except ImportError as exc:
        built.skip("fastvl FastV", f"fastvl.patch.transformers.apply_fastv is unavailable: {exc}")
        return built
    with_fastv = copy.deepcopy(with_fastvl)
    apply_fastv(with_fastv, layer=FASTV_LAYER, keep_ratio=FASTV_KEEP_RATIO)
    built.add("fastvl FastV", prefill(with_fastv, image_token_mask=image_mask))
    kept_tokens = tokens - image_tokens + keep_count(FASTV_KEEP_RATIO, image_tokens)
    built.shapes["fastv"]["tokens_after"] = kept_tokens
    built.compare["fastvl FastV"] = lambda actual, expected: _check_fastv(
        actual, expected, kept_tokens, before, rtol, atol
    )
    return built


def _fastv_dtypes(device: torch.device) -> tuple[torch.dtype, ...]:
    return (torch.float16,) if device.type == "cuda" else (torch.float32,)


if requires_module("transformers") is None:
    register_case(
        op="fastv",
        name="llama-prefill-576img",
        description=(
            "Prefill of a LLaMA-shaped decoder (random init; GPU: hidden 4096, 32 heads / 8 kv "
            "heads, intermediate 11008, 8 layers, float16; CPU: hidden 512, 8 / 2 heads, 1408, "
            f"4 layers, float32) on one prompt of {TEXT_BEFORE} text + {IMAGE_TOKENS} image + "
            f"{TEXT_AFTER} text tokens, with its KV cache: transformers SDPA vs "
            "attn_implementation=\"fastvl\" vs fastvl + FastV (apply_fastv: keep "
            f"{FASTV_KEEP_RATIO:g} of the image tokens after layer {FASTV_LAYER}, last-query "
            "ranking). Peak memory on CUDA."
        ),
        impls=IMPLS,
        baseline=BASELINE,
        modes=(FORWARD,),
        dtypes=_fastv_dtypes,
    )(_build_prefill)
