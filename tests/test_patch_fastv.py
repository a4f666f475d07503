"""FastV / PyramidDrop (``fastvl.patch.fastv.apply_fastv``) on tiny random LLaMA and LLaVA models.

The oracle, :func:`_reference`, runs the *unpatched* model's decoder layers one by one with
``"eager"`` attention on explicitly pruned sequences: after a stage layer it recomputes that
layer's q and k from the layer's input, ranks the image tokens with a plain softmax over
``q k^T`` (rows of prompt queries only, so that the same ranking serves the prompt followed by
generated tokens: the no-cache recomputation of a pruned generation), keeps the top ones per
sample, gathers the hidden states and continues with a dense mask and positions built for the
kept tokens. Tolerance: float32 on both sides, the same math in another order (1e-5 absolute,
1e-4 relative); the kept positions must be equal.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import (
    CLIPVisionConfig,
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    StaticCache,
)
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import fastvl.patch.transformers as fastvl_hf
from fastvl.patch.fastv import CRITERIA, FastVStage, apply_fastv, keep_count
from tests.conftest import DEVICE, own_backends, require_backend

ATOL, RTOL = 1e-5, 1e-4
IMAGE_TOKEN_ID = 127
NUM_LAYERS = 4


@pytest.fixture
def registered(request):
    """register(backend=request.param) for the test, unregister() after it."""
    backend = getattr(request, "param", "torch")
    require_backend("attention", backend)
    fastvl_hf.register(backend=backend)
    yield backend
    fastvl_hf.unregister()


def _llama_config():
    return LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=128, pad_token_id=0,
        eos_token_id=None,
    )


def _llama(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM._from_config(_llama_config(), attn_implementation="fastvl").to(
        DEVICE
    ).eval()


def _llava(seed=0):
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=32, patch_size=8,
    )  # 16 patches: 16 image tokens per image (the class token is dropped)
    config = LlavaConfig(
        vision_config=vision, text_config=_llama_config(), image_token_id=IMAGE_TOKEN_ID,
        projector_hidden_act="gelu",
    )
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration._from_config(config, attn_implementation="fastvl").to(
        DEVICE
    ).eval()


def _prompt(num_images=10, length=23, seed=1):
    """(input_ids, attention_mask, image_token_mask), batch 2: sample 0 has its image tokens at
    3..12 and a masked text token at 17 (a hole: the padding mask must be gathered, not
    sliced), sample 1 is left-padded by 2 and has them at 6..15; the rest is random text."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, IMAGE_TOKEN_ID, (2, length), generator=g)
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, :2] = 0
    ids[1, :2] = 0
    mask[0, 17] = 0
    ids[0, 3:3 + num_images] = IMAGE_TOKEN_ID
    ids[1, 6:6 + num_images] = IMAGE_TOKEN_ID
    return ids.to(DEVICE), mask.to(DEVICE), (ids == IMAGE_TOKEN_ID).to(DEVICE)


def _positions(attention_mask):
    """Position ids as generate computes them: counting real tokens, 0 on masked ones."""
    return (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)


# ---- the oracle ----------------------------------------------------------------------------


def _reference_scores(layer, layer_input, cos_sin, allowed, rows):
    """(B, n) attention each key gets from the query ``rows``, averaged over heads."""
    attn = layer.self_attn
    x = layer.input_layernorm(layer_input)
    batch, n = x.shape[:2]
    q = attn.q_proj(x).view(batch, n, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(batch, n, -1, attn.head_dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, *cos_sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = (q @ k.transpose(-1, -2) * attn.scaling).masked_fill(~allowed[:, None], -math.inf)
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # a row seeing nothing gives 0
    return probs[:, :, rows].sum(dim=2).mean(dim=1)


def _reference(model, embeds, image_mask, attention_mask, stages, *, criterion="last_query",
               renumber=False, prompt_len=None):
    """(logits at the kept tokens (B, N', V), [kept positions (B, N_s) per stage]).

    embeds (B, N, C): the decoder's input; image_mask (B, prompt_len) bool; the queries that
    rank are those of the first ``prompt_len`` tokens (default N).
    """
    decoder = model.get_decoder()
    batch, num_tokens = embeds.shape[:2]
    prompt_len = num_tokens if prompt_len is None else prompt_len
    image_mask = torch.nn.functional.pad(image_mask, (0, num_tokens - prompt_len))
    positions = _positions(attention_mask)
    kept = torch.arange(num_tokens, device=embeds.device).expand(batch, -1)
    num_images = int(image_mask[0].sum())
    ratios = {stage.layer: stage.keep_ratio for stage in stages}
    kept_per_stage, hidden = [], embeds
    model.set_attn_implementation("eager")
    try:
        for idx, layer in enumerate(decoder.layers):
            n = kept.shape[1]
            pos = positions.gather(1, kept)
            if renumber:
                pos = pos - (kept - torch.arange(n, device=kept.device))
            cos_sin = decoder.rotary_emb(hidden, pos)
            causal = torch.ones(n, n, dtype=torch.bool, device=kept.device).tril()
            allowed = causal & attention_mask.bool().gather(1, kept)[:, None, :]
            dense = torch.zeros(allowed.shape, device=kept.device).masked_fill(
                ~allowed, torch.finfo(torch.float32).min
            )
            layer_input = hidden
            hidden = layer(
                hidden, attention_mask=dense[:, None], position_embeddings=cos_sin,
                position_ids=pos,
            )
            if idx not in ratios:
                continue
            prompt_rows = int((kept[0] < prompt_len).sum())
            rows = [prompt_rows - 1] if criterion == "last_query" else list(range(prompt_rows))
            scores = _reference_scores(layer, layer_input, cos_sin, allowed, rows)
            keep = math.floor(ratios[idx] * num_images + 0.5)
            local = []
            for b in range(batch):
                is_image = image_mask[b, kept[b]]
                images = is_image.nonzero().flatten()
                best = torch.argsort(scores[b, images], descending=True, stable=True)[:keep]
                chosen = torch.cat([(~is_image).nonzero().flatten(), images[best]])
                local.append(chosen.sort().values)
            local = torch.stack(local)
            kept = kept.gather(1, local)
            hidden = hidden.gather(1, local[..., None].expand(-1, -1, hidden.shape[-1]))
            num_images = keep
            kept_per_stage.append(kept)
        logits = model.lm_head(decoder.norm(hidden))
    finally:
        model.set_attn_implementation("fastvl")
    return logits, kept_per_stage


def _real_rows(attention_mask, kept):
    """(B, N') bool: which kept tokens are not padding."""
    return attention_mask.bool().gather(1, kept)


def _assert_matches_reference(model, patch_kwargs, ids, mask, image_mask, embeds, **forward):
    patch = apply_fastv(model, **patch_kwargs)
    cache = DynamicCache(config=model.config)
    got = model(
        ids, attention_mask=mask, position_ids=_positions(mask), past_key_values=cache,
        use_cache=True, **forward,
    ).logits
    record = cache.fastvl_fastv_record
    patch.remove()
    want, kept = _reference(
        model, embeds, image_mask, mask, patch.stages, criterion=patch.criterion,
        renumber=patch.renumber_positions,
    )
    assert len(record.kept) == len(kept)
    for got_kept, want_kept in zip(record.kept, kept):
        assert torch.equal(got_kept, want_kept)
    real = _real_rows(mask, kept[-1])
    assert got.shape == want.shape
    torch.testing.assert_close(got[real], want[real], atol=ATOL, rtol=RTOL)
    return kept


# ---- LLaMA -----------------------------------------------------------------------------------


@pytest.mark.parametrize("registered", ["torch"], indirect=True)
def test_keep_ratio_one_is_the_unpatched_model(registered):
    model = _llama()
    ids, mask, image_mask = _prompt()
    want = model(ids, attention_mask=mask).logits
    patch = apply_fastv(model, layer=[1, 2], keep_ratio=1.0)
    assert patch.stages == ()
    assert torch.equal(model(ids, attention_mask=mask, image_token_mask=image_mask).logits, want)
    patch.remove()
    # Through the whole mechanism (ranking, gathers) with every image token kept (9.6 -> 10).
    patch = apply_fastv(model, layer=1, keep_ratio=0.96)
    got = model(ids, attention_mask=mask, image_token_mask=image_mask).logits
    patch.remove()
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("registered", own_backends("attention", "attention_key_mass"),
                         indirect=True)
@pytest.mark.parametrize("criterion", CRITERIA)
def test_llama_matches_pruned_reference(registered, criterion):
    """Batch 2 with image tokens at different positions and left padding, per-sample ranking."""
    model = _llama()
    ids, mask, image_mask = _prompt()
    embeds = model.get_decoder().embed_tokens(ids)
    kept = _assert_matches_reference(
        model, dict(layer=1, keep_ratio=0.5, criterion=criterion), ids, mask, image_mask,
        embeds, image_token_mask=image_mask,
    )
    assert kept[0].shape == (2, 23 - 10 + 5)
    assert not torch.equal(kept[0][0], kept[0][1])  # each sample ranks its own tokens


@pytest.mark.parametrize("registered", ["torch"], indirect=True)
def test_llama_multi_stage_renumbered_matches_reference(registered):
    model = _llama()
    ids, mask, image_mask = _prompt()
    embeds = model.get_decoder().embed_tokens(ids)
    kept = _assert_matches_reference(
        model, dict(layer=[0, 2], keep_ratio=[0.5, 0.6], renumber_positions=True,
                    criterion="all_queries"),
        ids, mask, image_mask, embeds, image_token_mask=image_mask,
    )
    assert [k.shape[1] for k in kept] == [23 - 10 + 5, 23 - 10 + 3]  # 5 then round(3.0)


@pytest.mark.parametrize("registered", ["torch"], indirect=True)
@pytest.mark.parametrize(
    "stages", [dict(layer=1, keep_ratio=0.4),
               dict(layer=[0, 2], keep_ratio=0.5, renumber_positions=True)],
    ids=["single", "multi-renumbered"],
)
def test_llama_generate_with_cache_matches_recomputation(registered, stages):
    """Greedy decoding over a pruned prefill's cache = the reference on prompt + new tokens."""
    model = _llama()
    ids, mask, image_mask = _prompt()
    patch = apply_fastv(model, **stages)
    out = model.generate(
        ids, attention_mask=mask, image_token_mask=image_mask, max_new_tokens=4,
        do_sample=False, output_logits=True, return_dict_in_generate=True,
    )
    patch.remove()
    prompt_len = ids.shape[1]
    for step, step_logits in enumerate(out.logits):
        seq = out.sequences[:, : prompt_len + step]
        seq_mask = torch.nn.functional.pad(mask, (0, step), value=1)
        want, _ = _reference(
            model, model.get_decoder().embed_tokens(seq), image_mask, seq_mask, patch.stages,
            renumber=patch.renumber_positions, prompt_len=prompt_len,
        )
        torch.testing.assert_close(step_logits, want[:, -1], atol=ATOL, rtol=RTOL)
        assert torch.equal(out.sequences[:, prompt_len + step], want[:, -1].argmax(-1))


@pytest.mark.parametrize("registered", ["torch"], indirect=True)
def test_image_token_id_marks_image_tokens_and_remove_restores(registered):
    model = _llama()
    ids, mask, image_mask = _prompt()
    want = model(ids, attention_mask=mask).logits
    layer = model.get_decoder().layers[2]
    patch = apply_fastv(model, layer=1, keep_ratio=0.3, image_token_id=IMAGE_TOKEN_ID)
    by_id = model(ids, attention_mask=mask).logits
    by_mask = model(ids, attention_mask=mask, image_token_mask=image_mask).logits
    assert by_id.shape == (2, 23 - 10 + 3, 128)
    assert torch.equal(by_id, by_mask)
    patch.remove()
    patch.remove()  # idempotent
    assert "forward" not in layer.__dict__ and "forward" not in model.__dict__
    assert torch.equal(model(ids, attention_mask=mask).logits, want)
    apply_fastv(model, layer=1, keep_ratio=0.5).remove()  # can be applied again


@pytest.mark.parametrize("registered", ["torch"], indirect=True)
def test_prefill_compiles(registered):
    """torch.compile (dynamo) gives the same logits; the image-count read is a graph break."""
    model = _llama()
    ids, mask, image_mask = _prompt()
    apply_fastv(model, layer=2, keep_ratio=0.5)

    def logits(ids, mask, image_mask):
        return model(ids, attention_mask=mask, image_token_mask=image_mask,
                     use_cache=False).logits

    got = torch.compile(logits, backend="eager")(ids, mask, image_mask)
    torch.testing.assert_close(got, logits(ids, mask, image_mask), atol=ATOL, rtol=RTOL)


# ---- LLaVA -----------------------------------------------------------------------------------


@pytest.mark.parametrize("registered", ["torch"], indirect=True)
def test_llava_matches_reference_and_generates(registered):
    """Image tokens from config.image_token_id; two different images; prefill and decoding."""
    model = _llava()
    ids, mask, image_mask = _prompt(num_images=16, length=24)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    embeds = model(ids, pixel_values=pixels, attention_mask=mask,
                   output_hidden_states=True).hidden_states[0]
    _assert_matches_reference(
        model, dict(layer=1, keep_ratio=0.5), ids, mask, image_mask, embeds,
        pixel_values=pixels,
    )
    patch = apply_fastv(model, layer=[1, 2], keep_ratio=[0.5, 0.5])
    out = model.generate(
        ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=3, do_sample=False,
        output_logits=True, return_dict_in_generate=True,
    )
    patch.remove()
    new = out.sequences[:, ids.shape[1]:]
    seq_mask = torch.nn.functional.pad(mask, (0, 2), value=1)
    seq_embeds = torch.cat([embeds, model.get_input_embeddings()(new[:, :2])], dim=1)
    want, _ = _reference(model, seq_embeds, image_mask, seq_mask, patch.stages,
                         prompt_len=ids.shape[1])
    for step in range(3):
        torch.testing.assert_close(out.logits[step], want[:, step - 3], atol=ATOL, rtol=RTOL)
    assert torch.equal(new, want[:, -3:].argmax(-1))


# ---- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("registered", ["torch"], indirect=True)
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(layer=1, keep_ratio=1.5), ValueError, r"keep_ratio must lie in \[0, 1\]"),
        (dict(layer=1, keep_ratio=-0.1), ValueError, r"keep_ratio must lie in \[0, 1\]"),
        (dict(layer=1, keep_ratio="half"), TypeError, "keep_ratio must be a float"),
        (dict(layer=3, keep_ratio=0.5), ValueError, r"layer must lie in \[0, num_layers - 2\]"),
        (dict(layer=-1, keep_ratio=0.5), ValueError, "layer must lie in"),
        (dict(layer=1.0, keep_ratio=0.5), TypeError, "layer must be an int"),
        (dict(layer=[2, 1], keep_ratio=0.5), ValueError, "strictly increasing"),
        (dict(layer=[0, 1], keep_ratio=[0.5] * 3), ValueError, "one per layer"),
        (dict(layer=[], keep_ratio=0.5), ValueError, "layer must not be empty"),
        (dict(layer=1, keep_ratio=0.5, criterion="max"), ValueError, "criterion must be one of"),
        (dict(layer=1, keep_ratio=0.5, renumber_positions=1), TypeError, "renumber_positions"),
        (dict(layer=1, keep_ratio=0.5, image_token_id="x"), TypeError, "image_token_id"),
    ],
)
def test_bad_arguments_raise(registered, kwargs, error, match):
    with pytest.raises(error, match=match):
        apply_fastv(_llama(), **kwargs)


@pytest.mark.parametrize("registered", ["torch"], indirect=True)
def test_bad_model_and_calls_raise(registered):
    model = _llama()
    ids, mask, image_mask = _prompt()
    with pytest.raises(TypeError, match="not a LLaMA-style decoder"):
        apply_fastv(torch.nn.Linear(2, 2), layer=0, keep_ratio=0.5)
    model.set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match='attn_implementation="fastvl"'):
        apply_fastv(model, layer=1, keep_ratio=0.5)
    model.set_attn_implementation("fastvl")
    patch = apply_fastv(model, layer=1, keep_ratio=0.5)
    with pytest.raises(ValueError, match="already has FastV applied"):
        apply_fastv(model, layer=1, keep_ratio=0.5)
    with pytest.raises(ValueError, match="pass image_token_mask"):
        model(ids)
    with pytest.raises(ValueError, match=r"must be \(B, N\) = \(2, 23\)"):
        model(ids, image_token_mask=image_mask[:, 1:])
    with pytest.raises(TypeError, match="torch.bool"):
        model(ids, image_token_mask=image_mask.long())
    uneven = image_mask.clone()
    uneven[0, 3] = False
    with pytest.raises(ValueError, match="same number of image tokens"):
        model(ids, image_token_mask=uneven)
    dense = torch.ones(23, 23, dtype=torch.bool, device=DEVICE).tril().expand(2, 1, 23, 23)
    with pytest.raises(ValueError, match="attention probe needs a causal or bidirectional"):
        model(ids, attention_mask=dense, image_token_mask=image_mask)
    static = StaticCache(config=model.config, max_cache_len=32)
    with pytest.raises(ValueError, match="DynamicCache"):
        model(ids, image_token_mask=image_mask, past_key_values=static, use_cache=True)
    with pytest.raises(RuntimeError, match="outside its decoder's forward"):
        model.get_decoder().layers[1](torch.zeros(2, 23, 64))
    patch.remove()


def test_keep_count_rounds_half_up():
    assert [keep_count(0.5, m) for m in (0, 1, 3, 5, 576)] == [0, 1, 2, 3, 288]
    assert keep_count(0.25, 10) == 3 and keep_count(0.0, 10) == 0 and keep_count(1.0, 7) == 7
    assert FastVStage(2, 0.5).layer == 2
