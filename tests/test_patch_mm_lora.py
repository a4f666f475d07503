"""MM-LoRA / PLoRA (``fastvl.patch.transformers.apply_mm_lora``) on tiny random LLaMA and LLaVA.

The oracle is the *unpatched* model with a forward hook on each targeted ``nn.Linear`` that adds
``scaling · x Aᵢᵀ Bᵢᵀ`` by hand, with adapter i picked per token from an image-token mask
(vision adapter on image rows, language adapter on text rows, none for a modality left out).
Both sides run float32 on the torch backend: the same math in another order (1e-5 / 1e-4).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

import fastvl.patch.transformers as fastvl_hf
from fastvl.nn.lora import RoutedLoRALinear
from fastvl.patch.mm_lora import MMLoRAPatch, _token_route
from tests.conftest import DEVICE, own_backends, require_backend

ATOL, RTOL = 1e-5, 1e-4
IMAGE_TOKEN_ID = 127
NUM_IMAGE_TOKENS = 16  # 32 x 32 image, 8 x 8 patches
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _llama_config():
    return LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, pad_token_id=0, eos_token_id=None,
    )


def _llama(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM._from_config(_llama_config(), attn_implementation="eager").to(
        DEVICE
    ).eval()


def _llava(seed=0):
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        image_size=32, patch_size=8,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=_llama_config(), image_token_id=IMAGE_TOKEN_ID,
        projector_hidden_act="gelu",
    )
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration._from_config(config, attn_implementation="eager").to(
        DEVICE
    ).eval()


def _ids(image_starts=(3, 5), length=25, seed=1):
    """(B, length) random text ids with NUM_IMAGE_TOKENS image tokens from ``image_starts[b]``
    (None: no image in that sample)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, IMAGE_TOKEN_ID, (len(image_starts), length), generator=g)
    for b, start in enumerate(image_starts):
        if start is not None:
            ids[b, start:start + NUM_IMAGE_TOKENS] = IMAGE_TOKEN_ID
    return ids.to(DEVICE)


def _pixels(batch, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 32, 32, generator=g).to(DEVICE)


def _randomize_lora_b(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, RoutedLoRALinear):
                module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=g) * 0.1)


def _hand_reference(base_model, patched, modalities, image_mask):
    """Hooks on ``base_model`` (an unpatched copy) adding the LoRA of each token's modality,
    with the adapters of ``patched``'s RoutedLoRALinear of the same name; returns the removers."""
    routed = {n: m for n, m in patched.named_modules() if isinstance(m, RoutedLoRALinear)}
    handles = []
    for name, linear in base_model.named_modules():
        if name not in routed:
            continue
        module = routed[name]

        def hook(linear, args, output, module=module):
            (x,) = args
            delta = torch.zeros_like(output)
            for index, modality in enumerate(modalities):
                rows = image_mask if modality == "vision" else ~image_mask
                lora = (x @ module.lora_A[index].T) @ module.lora_B[index].T * module.scaling
                delta = delta + rows[..., None] * lora
            return output + delta

        handles.append(linear.register_forward_hook(hook))
    return handles


def _close(actual, expected):
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL)


# ---- outputs -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "llava"])
def test_zero_b_equals_base_then_matches_per_modality_reference(kind):
    """B = 0 (peft's init): the base model's logits. Random B: the hand-applied adapters."""
    model = _llama() if kind == "llama" else _llava()
    base = copy.deepcopy(model)
    ids = _ids()
    image_mask = ids == IMAGE_TOKEN_ID
    if kind == "llama":
        inputs = dict(input_ids=ids, image_token_mask=image_mask)
        base_inputs = dict(input_ids=ids)
    else:
        inputs = base_inputs = dict(input_ids=ids, pixel_values=_pixels(2))

    patch = fastvl_hf.apply_mm_lora(model, r=4, alpha=8, backend="torch")
    assert isinstance(patch, MMLoRAPatch) and patch.modalities == ("vision", "language")
    assert len(patch.replaced) == 2 * len(TARGETS)
    with torch.no_grad():
        expected = base(**base_inputs).logits
        _close(model(**inputs).logits, expected)

        _randomize_lora_b(model)
        handles = _hand_reference(base, model, patch.modalities, image_mask)
        expected = base(**base_inputs).logits
        for handle in handles:
            handle.remove()
        actual = model(**inputs).logits
    _close(actual, expected)
    assert not torch.allclose(actual, base(**base_inputs).logits, atol=1e-3)


def test_plora_leaves_text_rows_alone():
    """modalities=("vision",): only image rows get a LoRA; text before the image is unchanged."""
    model = _llava()
    base = copy.deepcopy(model)
    ids, pixels = _ids(image_starts=(4, 6)), _pixels(2)
    patch = fastvl_hf.apply_mm_lora(model, r=4, alpha=8, modalities=("vision",),
                                    target_modules=("q_proj", "v_proj"), backend="torch")
    assert len(patch.replaced) == 4
    _randomize_lora_b(model)
    with torch.no_grad():
        plain = base(input_ids=ids, pixel_values=pixels).logits
        handles = _hand_reference(base, model, ("vision",), ids == IMAGE_TOKEN_ID)
        expected = base(input_ids=ids, pixel_values=pixels).logits
        for handle in handles:
            handle.remove()
        actual = model(input_ids=ids, pixel_values=pixels).logits
    _close(actual, expected)
    _close(actual[:, :4], plain[:, :4])  # causal: text before every image token
    assert not torch.allclose(actual[:, 4:], plain[:, 4:], atol=1e-3)


# ---- training ------------------------------------------------------------------------------


def test_only_lora_trains_and_unused_adapter_gets_zero_grads():
    model = _llama()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    patch = fastvl_hf.apply_mm_lora(model, r=4, alpha=8, backend="torch")
    _randomize_lora_b(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    ids = _ids(image_starts=(None, None))  # no image tokens: the vision adapter is unused
    model.train()
    loss = model(input_ids=ids, image_token_mask=ids == IMAGE_TOKEN_ID, labels=ids).loss
    loss.backward()
    for module in model.modules():
        if isinstance(module, RoutedLoRALinear):
            for grad in (module.lora_A.grad, module.lora_B.grad):
                assert grad is not None
                assert torch.count_nonzero(grad[0]) == 0  # vision
                assert torch.count_nonzero(grad[1]) > 0  # language
            assert module.base_layer.weight.grad is None
    patch.remove()
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def _lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind, backend, use_reentrant, enable_first", [
    *[(kind, "torch", reentrant, first) for kind in ("llama", "llava")
      for reentrant in (False, True) for first in (False, True)],
    ("llama", "triton", False, False),  # (interpreted on CPU: one case)
])
def test_gradient_checkpointing_matches_plain_backward(kind, backend, use_reentrant,
                                                       enable_first):
    """Checkpointed decoder layers recompute in the backward with the forward's route: loss
    and every LoRA gradient equal the run without checkpointing (attention and MLP targets,
    LoRA dropout, gradient checkpointing enabled before or after the patch)."""
    model = _llama() if kind == "llama" else _llava()
    targets = (*TARGETS, "gate_proj", "up_proj", "down_proj")
    ids = _ids()
    inputs = dict(input_ids=ids, labels=ids)
    if kind == "llava":
        inputs.update(pixel_values=_pixels(2))
    else:
        inputs.update(image_token_mask=ids == IMAGE_TOKEN_ID)

    def checkpointing():
        kwargs = {"use_reentrant": use_reentrant}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if use_reentrant:  # reentrant checkpoints need an input that requires grad
            model.enable_input_require_grads()

    if enable_first:
        checkpointing()
        getattr(model, "activation_checkpointing_disable",
                getattr(model, "gradient_checkpointing_disable", None))()
    require_backend("routed_lora_linear", backend)
    patch = fastvl_hf.apply_mm_lora(model, r=4, alpha=8, target_modules=targets,
                                    dropout=0.1, backend=backend)
    _randomize_lora_b(model)
    model.train()
    torch.manual_seed(7)  # the same dropout masks in both runs (and in the recompute)
    plain_loss = model(**inputs).loss
    plain_loss.backward()
    plain = _lora_grads(model)
    model.zero_grad(set_to_none=True)
    checkpointing()
    functions = {m: m.__dict__["_gradient_checkpointing_func"] for m in model.modules()
                 if "_gradient_checkpointing_func" in m.__dict__}
    torch.manual_seed(7)
    loss = model(**inputs).loss
    loss.backward()
    checkpointed = _lora_grads(model)
    _close(loss, plain_loss)
    assert len(plain) == 2 * len(patch.replaced) and plain.keys() == checkpointed.keys()
    for name, grad in plain.items():
        _close(checkpointed[name], grad)
    patch.remove()  # the checkpoint functions go back to transformers' own
    assert functions and all(m._gradient_checkpointing_func is f for m, f in functions.items())


def test_triton_backend_trains_like_torch_backend():
    """Liger-style: 4 AdamW steps of MM-LoRA on a tiny LLaMA, routed triton kernels vs the
    torch backend: losses and LoRA parameters step by step."""
    require_backend("routed_lora_linear", "triton")
    ids = _ids()
    histories = []
    for backend in own_backends("routed_lora_linear"):
        model = _llama()
        fastvl_hf.apply_mm_lora(model, r=4, alpha=8, backend=backend)
        _randomize_lora_b(model)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        history = []
        for _ in range(4):
            loss = model(input_ids=ids, image_token_mask=ids == IMAGE_TOKEN_ID, labels=ids).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            history.append((loss.item(), [p.detach().clone() for p in params]))
        histories.append(history)
    for step, ((want_loss, want), (loss, got)) in enumerate(zip(*histories)):
        assert loss == pytest.approx(want_loss, rel=1e-5), f"step {step}"
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"step {step}")
    assert histories[0][-1][0] < histories[0][0][0]


def test_forward_runs_no_route_range_check(monkeypatch):
    """The route MM-LoRA builds is valid by construction: no range check (host sync) at any
    layer, in the forward or in generate."""
    import fastvl.ops.lora as ops_lora

    def no_check(*args):
        raise AssertionError("route range checked")

    monkeypatch.setattr(ops_lora, "_check_route_range", no_check)
    model = _llava()
    fastvl_hf.apply_mm_lora(model, r=2, alpha=4, backend="torch")
    with torch.no_grad():
        model(input_ids=_ids(), pixel_values=_pixels(2))
        model.generate(input_ids=_ids(), pixel_values=_pixels(2), max_new_tokens=2,
                       do_sample=False)


def test_route_needs_no_host_sync():
    """The route builds on meta tensors, which have no values to read back: no host syncs."""
    tokens = torch.empty(2, 3, 8, device="meta")
    for width, past in [(3, 0), (5, 4), (2, 7)]:  # own tokens; the sequence's mask, in / past it
        mask = torch.empty(2, width, dtype=torch.bool, device="meta")
        route = _token_route(mask, tokens, past, vision=0, language=1)
        assert route.shape == (2, 3) and route.dtype == torch.int64


# ---- generation ----------------------------------------------------------------------------


def _greedy_without_cache(model, ids, steps, inputs_for):
    """(ids + ``steps`` greedy tokens, [last-row logits per step]), each step a full forward
    over the sequence so far."""
    step_logits = []
    for _ in range(steps):
        logits = model(input_ids=ids, use_cache=False, **inputs_for(ids)).logits[:, -1]
        step_logits.append(logits)
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids, step_logits


@pytest.mark.parametrize("kind", ["llama", "llava"])
def test_generate_with_cache_routes_new_tokens_as_text(kind):
    """generate (cache: decode steps see only new tokens) = greedy full recomputation."""
    model = _llama() if kind == "llama" else _llava()
    fastvl_hf.apply_mm_lora(model, r=4, alpha=8, backend="torch")
    _randomize_lora_b(model, seed=5)
    ids = _ids(length=21, image_starts=(2, 5))  # sample 1 ends in image tokens
    prompt_mask = ids == IMAGE_TOKEN_ID
    if kind == "llama":  # the prompt's mask goes to every step; later tokens are text
        extra = dict(image_token_mask=prompt_mask)

        def inputs_for(seq):
            return dict(image_token_mask=nn.functional.pad(
                prompt_mask, (0, seq.shape[1] - prompt_mask.shape[1])))
    else:
        extra = dict(pixel_values=_pixels(2))

        def inputs_for(seq):
            return extra
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, **extra)
        expected_ids, expected_logits = _greedy_without_cache(model, ids, 4, inputs_for)
    torch.testing.assert_close(out.sequences, expected_ids, atol=0, rtol=0)
    for actual, expected in zip(out.logits, expected_logits, strict=True):
        _close(actual, expected)


# ---- remove and errors ---------------------------------------------------------------------


def test_remove_restores_the_model():
    model = _llava()
    ids, pixels = _ids(), _pixels(2)
    with torch.no_grad():
        before = model(input_ids=ids, pixel_values=pixels).logits
    state_keys = set(model.state_dict())
    patch = fastvl_hf.apply_mm_lora(model, r=2, alpha=4, backend="torch")
    _randomize_lora_b(model)
    with pytest.raises(ValueError, match="already has MM-LoRA"):
        fastvl_hf.apply_mm_lora(model, r=2, alpha=4)
    patch.remove()
    patch.remove()  # no-op once done
    assert not any(isinstance(m, RoutedLoRALinear) for m in model.modules())
    assert "forward" not in model.__dict__ and set(model.state_dict()) == state_keys
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        _close(model(input_ids=ids, pixel_values=pixels).logits, before)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(modalities=("audio",)), ValueError, "modalities must be distinct entries"),
    (dict(modalities=()), ValueError, "modalities must be distinct entries"),
    (dict(modalities=("vision", "vision")), ValueError, "modalities must be distinct entries"),
    (dict(modalities="vision"), TypeError, "modalities must be a sequence of str"),
    (dict(r=0), ValueError, "r must be a positive int"),
    (dict(alpha=None), TypeError, "alpha must be a finite"),
    (dict(target_modules=("gate",)), ValueError, "no nn.Linear named"),
    (dict(backend="cutlass"), ValueError, "backend must be 'auto' or one of"),
    (dict(image_token_id=1.5), TypeError, "image_token_id must be an int"),
])
def test_bad_arguments_leave_the_model_untouched(kwargs, error, match):
    model = _llama()
    args = dict(r=4, alpha=8) | kwargs
    with pytest.raises(error, match=match):
        fastvl_hf.apply_mm_lora(model, **args)
    assert all(p.requires_grad for p in model.parameters())
    assert not any(isinstance(m, RoutedLoRALinear) for m in model.modules())


def test_forward_without_kwargs_is_refused_and_undone():
    model = _llama()

    def forward(input_ids):
        return input_ids

    model.forward = forward
    with pytest.raises(TypeError, match="takes no \\*\\*kwargs"):
        fastvl_hf.apply_mm_lora(model, r=4, alpha=8)
    assert model.forward is forward and all(p.requires_grad for p in model.parameters())
    assert not any(isinstance(m, RoutedLoRALinear) for m in model.modules())


def test_plain_llama_needs_image_tokens_for_a_vision_adapter():
    ids = _ids()
    model = _llama()
    fastvl_hf.apply_mm_lora(model, r=4, alpha=8, backend="torch")
    with pytest.raises(ValueError, match="no image tokens known"):
        model(input_ids=ids)
    with pytest.raises(ValueError, match="image_token_mask must be"):
        model(input_ids=ids, image_token_mask=(ids == IMAGE_TOKEN_ID)[:, :5])
    with pytest.raises(TypeError, match="torch.bool tensor"):
        model(input_ids=ids, image_token_mask=ids)
    # language only: every token is text without a mask, and with image_token_id the same
    language_only, by_id = _llama(), _llama()
    fastvl_hf.apply_mm_lora(language_only, r=4, alpha=8, modalities=("language",),
                            backend="torch")
    fastvl_hf.apply_mm_lora(by_id, r=4, alpha=8, modalities=("language",), backend="torch",
                            image_token_id=IMAGE_TOKEN_ID)
    _randomize_lora_b(language_only)
    by_id.load_state_dict(language_only.state_dict())
    with torch.no_grad():
        all_text = language_only(input_ids=ids).logits
        masked = language_only(input_ids=ids, image_token_mask=ids == IMAGE_TOKEN_ID).logits
        _close(by_id(input_ids=ids).logits, masked)
    assert not torch.allclose(all_text, masked, atol=1e-3)
