"""``attn_implementation="fastvl"`` in transformers models against ``"eager"``, float32.

Each test builds a tiny random-init model from a config (no hub access), runs it with
``"fastvl"`` and then, same weights, with ``"eager"`` (``model.set_attn_implementation``), and
compares logits / hidden states on the non-padded positions (a fully masked query row is 0 with
fastvl, the mean of all values with eager; see :mod:`fastvl.patch.transformers`). The
``paths`` fixture counts which kind of mask each attention call carried, so a test also fails when
a case meant for the kernels (causal + key bias) silently gets a dense mask, or the reverse.

Tolerance: float32 on both sides, the same math in a different order: 1e-5 absolute.
"""

from __future__ import annotations

import collections

import pytest
import torch
from transformers import (
    BertConfig,
    BertModel,
    CLIPConfig,
    CLIPModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    ViTConfig,
    ViTModel,
)
from transformers.masking_utils import (
    bidirectional_mask_function,
    causal_mask_function,
    sdpa_mask,
    sliding_window_causal_mask_function,
)

import fastvl.patch.transformers as fastvl_hf
from fastvl.ops import BackendNotSupportedError
from fastvl.reference.attention import attention_bias
from tests.conftest import DEVICE, own_backends, require_backend

ATOL = 1e-5
BACKENDS = own_backends("attention")


@pytest.fixture
def registered(request):
    """register(backend=request.param) for the test, unregister() after it."""
    backend = getattr(request, "param", "torch")
    require_backend("attention", backend)
    fastvl_hf.register(backend=backend)
    yield backend
    fastvl_hf.unregister()


@pytest.fixture
def paths(monkeypatch):
    """Counter of attention op calls by what they carry: "fastvl" (causal / key_bias only, what
    the kernels serve) and "sdpa" (a dense attn_mask or dropout, which the registry sends to
    SDPA or the torch backend)."""
    counts = collections.Counter()
    attention = fastvl_hf.attention

    def counting(*args, **kwargs):
        dense = kwargs.get("attn_mask") is not None or kwargs.get("dropout_p", 0.0) > 0.0
        counts["sdpa" if dense else "fastvl"] += 1
        return attention(*args, **kwargs)

    monkeypatch.setattr(fastvl_hf, "attention", counting)
    return counts


def _build(model_cls, config, seed=0):
    torch.manual_seed(seed)
    return model_cls._from_config(config, attn_implementation="fastvl").to(DEVICE).eval()


def _fastvl_and_eager(model, run):
    """(run(model) with "fastvl", run(model) with "eager"), same weights."""
    got = run(model)
    model.set_attn_implementation("eager")
    try:
        want = run(model)
    finally:
        model.set_attn_implementation("fastvl")
    return got, want


def _llama_config(**overrides):
    return LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, pad_token_id=0, eos_token_id=None,
        **overrides,
    )


def _token_batch(padding, batch=2, length=7, seed=1):
    """(input_ids, attention_mask) with the second sample padded by 3 on the given side."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    if padding == "left":
        mask[1, :3] = 0
    elif padding == "right":
        mask[1, -3:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids.to(DEVICE), mask.to(DEVICE)


def _assert_close_where(got, want, keep, name):
    assert got.shape == want.shape, name
    torch.testing.assert_close(got[keep], want[keep], atol=ATOL, rtol=1e-5, msg=name)


# ---- decoders: LLaMA (GQA) ----------------------------------------------------------------


@pytest.mark.parametrize("registered", BACKENDS, indirect=True)
@pytest.mark.parametrize("padding", ["none", "right", "left"])
def test_llama_logits_match_eager(registered, paths, padding):
    model = _build(LlamaForCausalLM, _llama_config())
    ids, mask = _token_batch(padding)
    got, want = _fastvl_and_eager(model, lambda m: m(ids, attention_mask=mask).logits)
    _assert_close_where(got, want, mask.bool(), "logits")
    assert paths == {"fastvl": 2}  # causal + key padding: the op, in both layers


@pytest.mark.parametrize("registered", BACKENDS, indirect=True)
def test_llama_generate_matches_eager(registered, paths):
    """Left-padded greedy generation with a dynamic KV cache: prefill Nq = Nk, then Nq = 1."""
    model = _build(LlamaForCausalLM, _llama_config())
    ids, mask = _token_batch("left")

    def generate(m):
        return m.generate(
            ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
            output_logits=True, return_dict_in_generate=True,
        )

    got, want = _fastvl_and_eager(model, generate)
    assert torch.equal(got.sequences, want.sequences)
    for step, (g, w) in enumerate(zip(got.logits, want.logits, strict=True)):
        torch.testing.assert_close(g, w, atol=ATOL, rtol=1e-5, msg=f"step {step} logits")
    assert paths == {"fastvl": 2 * 4}


@pytest.mark.parametrize("registered", BACKENDS, indirect=True)
def test_llama_gradients_match_eager(registered, paths):
    model = _build(LlamaForCausalLM, _llama_config())
    ids, mask = _token_batch("right")
    labels = ids.masked_fill(mask == 0, -100)

    def grads(m):
        m.zero_grad()
        m(ids, attention_mask=mask, labels=labels).loss.backward()
        return {name: p.grad.clone() for name, p in m.named_parameters()}

    got, want = _fastvl_and_eager(model, grads)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=ATOL, rtol=1e-4, msg=name)
    assert paths == {"fastvl": 2}


@pytest.mark.parametrize("registered", ["torch"], indirect=True)
def test_llama_static_cache_generate_takes_dense_path(registered, paths):
    """A static cache's keys are not aligned bottom-right: the dense mask path, still exact."""
    model = _build(LlamaForCausalLM, _llama_config())
    ids, mask = _token_batch("left")

    def generate(m):
        return m.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                          cache_implementation="static")

    got, want = _fastvl_and_eager(model, generate)
    assert torch.equal(got, want)
    assert paths == {"sdpa": 2 * 3}


@pytest.mark.parametrize("registered", ["torch"], indirect=True)
def test_llama_custom_4d_mask_and_packed_sequences(registered, paths):
    model = _build(LlamaForCausalLM, _llama_config())
    ids, _ = _token_batch("none")
    # A user's 4D float mask: causal, plus query 5 may not see key 2.
    allowed = torch.ones(7, 7, dtype=torch.bool, device=DEVICE).tril()
    allowed[5, 2] = False
    custom = torch.zeros(2, 1, 7, 7, device=DEVICE).masked_fill(~allowed, torch.finfo().min)
    got, want = _fastvl_and_eager(model, lambda m: m(ids, attention_mask=custom).logits)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-5)
    # Two sequences packed in each row: position_ids restart, so attention must not cross.
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2, 3]] * 2, device=DEVICE)
    got, want = _fastvl_and_eager(
        model, lambda m: m(ids, position_ids=position_ids, use_cache=False).logits
    )
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-5)
    alone = model(ids[:, 3:], position_ids=position_ids[:, 3:], use_cache=False).logits
    torch.testing.assert_close(got[:, 3:], alone, atol=ATOL, rtol=1e-5)
    assert paths == {"sdpa": 2 + 2, "fastvl": 2}  # the last call, unpacked: the op


# ---- sliding window: Mistral ---------------------------------------------------------------


@pytest.mark.parametrize("registered", ["torch"], indirect=True)
def test_sliding_window_generate_matches_eager(registered, paths):
    """Prefill (Nq > 1) takes the dense path; every decoding step's mask row is a key bias."""
    config = MistralConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, pad_token_id=0, eos_token_id=None,
        sliding_window=3,
    )
    model = _build(MistralForCausalLM, config)
    ids, mask = _token_batch("left", length=4)  # padded keys stay in the first windows

    def generate(m):
        return m.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                          output_logits=True, return_dict_in_generate=True)

    got, want = _fastvl_and_eager(model, generate)
    assert torch.equal(got.sequences, want.sequences)
    for step, (g, w) in enumerate(zip(got.logits, want.logits, strict=True)):
        torch.testing.assert_close(g, w, atol=ATOL, rtol=1e-5, msg=f"step {step} logits")
    assert paths == {"sdpa": 2, "fastvl": 2 * 3}


# ---- encoders: BERT, CLIP, ViT -------------------------------------------------------------


def _bert_config(**overrides):
    return BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        vocab_size=128, max_position_embeddings=32, **overrides,
    )


@pytest.mark.parametrize("registered", BACKENDS, indirect=True)
def test_bert_encoder_and_cross_attention_match_eager(registered, paths):
    ids, mask = _token_batch("right")
    encoder = _build(BertModel, _bert_config())
    got, want = _fastvl_and_eager(
        encoder, lambda m: m(ids, attention_mask=mask).last_hidden_state
    )
    _assert_close_where(got, want, mask.bool(), "encoder hidden states")

    # Causal decoder with cross-attention (Nq = 7 queries, Nk = 5 padded encoder states).
    decoder = _build(BertModel, _bert_config(is_decoder=True, add_cross_attention=True))
    states = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    states_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], device=DEVICE)

    def run(m):
        return m(ids, attention_mask=mask, encoder_hidden_states=states,
                 encoder_attention_mask=states_mask, use_cache=False).last_hidden_state

    got, want = _fastvl_and_eager(decoder, run)
    _assert_close_where(got, want, mask.bool(), "decoder hidden states")
    assert paths == {"fastvl": 2 + 2 * 2}


@pytest.mark.parametrize("registered", ["torch"], indirect=True)
def test_attention_dropout_runs_sdpa_like_sdpa(registered, paths):
    """Training with dropout: SDPA with the mask made dense, the same draws as "sdpa"."""
    ids, mask = _token_batch("right")
    config = _bert_config(attention_probs_dropout_prob=0.5, hidden_dropout_prob=0.0)
    model = _build(BertModel, config)
    model.train()

    def run(m):
        torch.manual_seed(3)
        return m(ids, attention_mask=mask).last_hidden_state

    got = run(model)
    model.set_attn_implementation("sdpa")
    want = run(model)
    _assert_close_where(got, want, mask.bool(), "hidden states")
    assert paths == {"sdpa": 2}


@pytest.mark.parametrize("registered", ["torch"], indirect=True)
def test_clip_matches_eager(registered, paths):
    """Text tower: causal + padding (is_causal=True keyword); vision tower: no mask."""
    config = CLIPConfig(
        text_config=dict(vocab_size=128, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=16, eos_token_id=127),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, image_size=16, patch_size=4),
        projection_dim=16,
    )
    model = _build(CLIPModel, config)
    ids, mask = _token_batch("right")
    ids[0, -1] = ids[1, 3] = 127  # eos, pooled
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4)).to(DEVICE)

    def run(m):
        out = m(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        return out.text_model_output.last_hidden_state, out.vision_model_output.last_hidden_state

    (got_text, got_vision), (want_text, want_vision) = _fastvl_and_eager(model, run)
    _assert_close_where(got_text, want_text, mask.bool(), "text hidden states")
    torch.testing.assert_close(got_vision, want_vision, atol=ATOL, rtol=1e-5)
    assert paths == {"fastvl": 2 + 2}


@pytest.mark.parametrize("registered", BACKENDS, indirect=True)
def test_vit_matches_eager(registered, paths):
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, image_size=16, patch_size=4)
    model = _build(ViTModel, config)
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    got, want = _fastvl_and_eager(model, lambda m: m(pixels).last_hidden_state)
    assert got.shape == (2, 17, 32)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-5)
    assert paths == {"fastvl": 2}


@pytest.mark.parametrize("registered", BACKENDS, indirect=True)
def test_llama_compiles_without_graph_breaks(registered):
    """Mask function, KeyBiasMask and the op trace in one graph (dynamo; inductor on GPU)."""
    model = _build(LlamaForCausalLM, _llama_config())
    ids, mask = _token_batch("left")

    def logits(ids, mask):
        return model(ids, attention_mask=mask, use_cache=False).logits

    compiler = "inductor" if DEVICE.type == "cuda" else "eager"
    got = torch.compile(logits, fullgraph=True, backend=compiler)(ids, mask)
    torch.testing.assert_close(got, logits(ids, mask), atol=ATOL, rtol=1e-5)


# ---- the mask function ---------------------------------------------------------------------


def _materialize(mask, batch, q_length, kv_length):
    """A KeyBiasMask as the dense bool (B, 1, Nq, Nk) mask it stands for."""
    q = torch.empty(batch, 1, q_length, 1, device=DEVICE)
    k = torch.empty(batch, 1, kv_length, 1, device=DEVICE)
    bias = attention_bias(q, k, causal=mask.causal, key_bias=mask.key_bias, dtype=torch.float32)
    if bias is None:
        return torch.ones(batch, 1, q_length, kv_length, dtype=torch.bool, device=DEVICE)
    return torch.isfinite(bias).expand(batch, 1, q_length, kv_length)


# (mask_function, q_length, kv_length, q_offset, kv_offset, padding, flags, structured?)
MASK_CASES = [
    ("causal", 7, 7, 0, 0, None, {}, True),
    ("causal", 7, 7, 0, 0, "left", {}, True),
    ("causal", 1, 9, 8, 0, "left", {}, True),  # decoding with a dynamic cache
    ("causal", 3, 9, 6, 0, "right", {}, True),  # cache continuation, Nq < Nk
    ("causal", 4, 9, 0, 0, "right", {}, False),  # static cache prefill: not bottom-right
    ("causal", 7, 7, 0, 0, "left", dict(allow_is_causal_skip=False), False),
    ("bidirectional", 7, 5, 0, 0, "right", dict(allow_is_bidirectional_skip=True,
                                                 allow_is_causal_skip=False), True),
    ("bidirectional", 7, 7, 0, 0, None, dict(allow_is_bidirectional_skip=False,
                                             allow_is_causal_skip=False), False),
    ("sliding", 7, 7, 0, 0, "left", {}, False),
    ("sliding", 1, 3, 9, 7, "left", {}, True),  # sliding-window decoding: one mask row
    ("sliding", 1, 6, 5, 0, "right", {}, True),  # ... the window hides keys 0-2
    ("causal", 1, 9, 4, 0, "left", {}, True),  # static cache decoding, eager: hides 5-8
    ("causal", 1, 9, 4, 0, "left", dict(allow_is_causal_skip=False), False),  # compiled
]
MASK_FUNCTIONS = {
    "causal": causal_mask_function,
    "bidirectional": bidirectional_mask_function,
    "sliding": sliding_window_causal_mask_function(3),
}


@pytest.mark.parametrize("case", MASK_CASES)
def test_mask_function_equals_sdpa_mask(case):
    name, q_length, kv_length, q_offset, kv_offset, padding, flags, structured = case
    batch, total = 2, kv_offset + kv_length
    padding_mask = None
    if padding is not None:
        padding_mask = torch.ones(batch, total, dtype=torch.bool, device=DEVICE)
        padding_mask[1, :2] = padding == "right"
        padding_mask[1, -2:] = padding == "left"
    kwargs = dict(batch_size=batch, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                  kv_offset=kv_offset, mask_function=MASK_FUNCTIONS[name],
                  attention_mask=padding_mask, device=DEVICE)
    got = fastvl_hf.fastvl_attention_mask(**kwargs, **flags)
    want = sdpa_mask(**kwargs, allow_is_causal_skip=False)
    assert isinstance(got, fastvl_hf.KeyBiasMask) == structured
    if structured:
        got = _materialize(got, batch, q_length, kv_length)
    assert torch.equal(got, want)


# ---- the attention function: unsupported inputs, weights, backend, gradcheck -------------


def _qkv(dtype=torch.float32, requires_grad=False):
    g = torch.Generator().manual_seed(6)
    shapes = ((2, 4, 5, 8), (2, 2, 5, 8), (2, 2, 5, 8))
    return [torch.randn(*s, generator=g, dtype=dtype).to(DEVICE).requires_grad_(requires_grad)
            for s in shapes]


def test_unsupported_kwargs_raise_and_weights_are_none():
    module = torch.nn.Module()
    q, k, v = _qkv()
    for name in ("softcap", "s_aux", "sinks"):
        with pytest.raises(ValueError, match=name):
            fastvl_hf.fastvl_attention_forward(module, q, k, v, None, **{name: 1.0})
    with pytest.warns(UserWarning, match="attention weights"):
        out, weights = fastvl_hf.fastvl_attention_forward(
            module, q, k, v, None, output_attentions=True, backend="torch"
        )
    assert out.shape == (2, 5, 4, 8) and weights is None


def test_position_bias_takes_sdpa_with_the_mask(paths):
    """A T5-style position_bias is added to the logits together with the KeyBiasMask."""
    module = torch.nn.Module()
    module.num_key_value_groups = 2  # read by transformers' SDPA function for GQA
    q, k, v = _qkv()
    key_bias = torch.zeros(2, 5, device=DEVICE)
    key_bias[0, 1] = float("-inf")
    mask = fastvl_hf.KeyBiasMask(causal=True, key_bias=key_bias)
    position_bias = torch.randn(1, 4, 5, 5, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    out, _ = fastvl_hf.fastvl_attention_forward(
        module, q, k, v, mask, scaling=0.5, position_bias=position_bias
    )
    logits = q @ k.repeat_interleave(2, dim=1).transpose(-1, -2) * 0.5 + position_bias
    logits = logits + attention_bias(q, k, causal=True, key_bias=key_bias)
    want = (logits.softmax(-1) @ v.repeat_interleave(2, dim=1)).transpose(1, 2)
    torch.testing.assert_close(out, want, atol=ATOL, rtol=1e-5)
    assert paths == {"sdpa": 1}


def test_gradcheck_float64():
    q, k, v = _qkv(torch.float64, requires_grad=True)
    key_bias = torch.zeros(2, 5, dtype=torch.float32, device=DEVICE)
    key_bias[1, 3:] = float("-inf")
    mask = fastvl_hf.KeyBiasMask(causal=True, key_bias=key_bias)

    def fn(q, k, v):
        return fastvl_hf.fastvl_attention_forward(
            torch.nn.Module(), q, k, v, mask, scaling=0.3, backend="torch"
        )[0]

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_register_unregister_and_backend():
    config = _llama_config()
    fastvl_hf.unregister()
    assert not fastvl_hf.is_registered()
    with pytest.raises(ValueError, match="fastvl"):
        LlamaForCausalLM._from_config(config, attn_implementation="fastvl")
    with pytest.raises(ValueError, match="backend"):
        fastvl_hf.register(backend="cuda")
    try:
        fastvl_hf.register(backend="triton")
        fastvl_hf.register(backend="torch")  # idempotent: the last backend wins
        assert fastvl_hf.is_registered()
        model = _build(LlamaForCausalLM, config).double()
        ids, mask = _token_batch("right")
        assert model(ids, attention_mask=mask).logits.dtype == torch.float64
        fastvl_hf.register(backend="triton")  # an explicit backend that cannot serve raises
        with pytest.raises(BackendNotSupportedError, match="triton"):
            model(ids, attention_mask=mask)
    finally:
        fastvl_hf.unregister()
    assert not fastvl_hf.is_registered()
    fastvl_hf.unregister()  # a second time: no-op
