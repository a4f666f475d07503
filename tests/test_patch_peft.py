"""peft's API on a model that ``fastvl.patch.peft.accelerate`` patched works as without it.

A tiny random LLaMA (hidden 32, 2 layers) with two peft adapters of different ranks, scalings
and target layers is built twice from the same seed; one copy is accelerated right after
``get_peft_model``. The same sequence of peft operations (forward, a training step,
``set_adapter``, ``disable_adapter()``, several active adapters, ``merge_adapter`` /
``unmerge_adapter``, ``save_pretrained`` + ``load_adapter``, ``add_adapter`` /
``delete_adapter``, ``merge_and_unload(safe_merge=True)``) runs on both and every result is
compared: peft's own layers are the oracle. Tolerance: the same math in another summation
order, so roundoff of the dtype (float64 on the torch backend, float32 on triton); the
``requires_grad`` flags, saved tensor names and state-dict keys must be equal exactly.
"""

from __future__ import annotations

import functools

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from fastvl.patch import peft as fastvl_peft
from fastvl.testing import random_tensor
from tests.conftest import DEVICE, require_backend

CASES = {"torch": (torch.float64, dict(rtol=1e-9, atol=1e-10)),
         "triton": (torch.float32, dict(rtol=1e-4, atol=1e-5))}
DEFAULT_TARGETS = ["q_proj", "v_proj", "down_proj"]
OTHER_TARGETS = ["q_proj", "k_proj", "o_proj", "up_proj"]
LAYERS = 2


def _generator(seed):
    return torch.Generator(device=DEVICE).manual_seed(seed)


def _randomize_b(model, adapter, seed):
    """peft inits B to zeros; the tests need non-zero adapters."""
    generator = _generator(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if f"lora_B.{adapter}." in name:
                p.copy_(random_tensor(*p.shape, dtype=p.dtype, device=DEVICE,
                                      generator=generator) * 0.1)


def _two_adapter_llama(dtype, accelerated, backend):
    """Adapter "default" (r 4, alpha 8, no dropout) and "other" (r 8, alpha 4, dropout 0.1),
    both plain LoRA; accelerated right after get_peft_model when asked."""
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=32)
    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM(config).to(DEVICE, dtype),
                           LoraConfig(r=4, lora_alpha=8, target_modules=DEFAULT_TARGETS))
    if accelerated:
        fastvl_peft.accelerate(model, backend=backend)
    model.add_adapter("other", LoraConfig(r=8, lora_alpha=4, lora_dropout=0.1,
                                          target_modules=OTHER_TARGETS))
    _randomize_b(model, "default", seed=1)
    _randomize_b(model, "other", seed=2)
    return model.eval()


def _ids(seed=3):
    return torch.randint(0, 96, (2, 7), generator=_generator(seed), device=DEVICE)


def _logits(model):
    with torch.no_grad():
        return model(input_ids=_ids()).logits


def _peft_operations(model, path):
    """Run the sequence of peft operations on ``model``; {step: result} to compare."""
    results = {"logits default": _logits(model)}
    model.train()
    loss = model(input_ids=_ids(4), labels=_ids(4)).loss
    loss.backward()
    results["loss"] = loss.detach()
    results["grads"] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.5 * p.grad
    model.zero_grad(set_to_none=True)
    model.eval()
    results["logits after step"] = _logits(model)
    results["requires_grad default"] = {n: p.requires_grad for n, p in model.named_parameters()}

    model.set_adapter("other")
    results["logits other"] = _logits(model)
    results["requires_grad other"] = {n: p.requires_grad for n, p in model.named_parameters()}
    with model.disable_adapter():
        results["logits disabled"] = _logits(model)
    results["logits other again"] = _logits(model)
    model.base_model.set_adapter(["default", "other"])
    results["logits both"] = _logits(model)
    model.set_adapter("default")

    model.merge_adapter()
    results["state merged"] = model.state_dict()
    results["logits merged"] = _logits(model)
    model.unmerge_adapter()
    results["state unmerged"] = model.state_dict()
    results["logits unmerged"] = _logits(model)

    model.save_pretrained(path)
    results["saved default"] = load_file(path / "adapter_model.safetensors")
    results["saved other"] = load_file(path / "other" / "adapter_model.safetensors")
    model.load_adapter(path / "other", adapter_name="loaded")
    model.set_adapter("loaded")
    results["logits loaded"] = _logits(model)

    model.add_adapter("third", LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj",
                                                                             "gate_proj"]))
    _randomize_b(model, "third", seed=5)
    model.set_adapter("third")
    results["logits third"] = _logits(model)
    model.set_adapter("default")
    model.delete_adapter("third")
    model.delete_adapter("loaded")
    results["state after delete"] = model.state_dict()
    results["logits after delete"] = _logits(model)

    unloaded = model.merge_and_unload(safe_merge=True)
    results["state unloaded"] = unloaded.state_dict()
    results["logits unloaded"] = _logits(unloaded)
    return results


def _assert_same(actual, expected, tolerance, where):
    if isinstance(expected, dict):
        assert list(actual) == list(expected), where
        for key in expected:
            _assert_same(actual[key], expected[key], tolerance, f"{where}: {key}")
    elif isinstance(expected, torch.Tensor):
        torch.testing.assert_close(actual, expected, **tolerance, msg=where)
    else:
        assert actual == expected, where


@pytest.mark.parametrize("backend", list(CASES))
def test_peft_operations_on_accelerated_model_match_plain_peft(backend, tmp_path):
    require_backend("lora_linear", backend)
    dtype, tolerance = CASES[backend]
    expected = _peft_operations(_two_adapter_llama(dtype, False, backend), tmp_path / "plain")
    actual = _peft_operations(_two_adapter_llama(dtype, True, backend), tmp_path / "fast")
    assert list(actual) == list(expected)
    for step in expected:
        _assert_same(actual[step], expected[step], tolerance, step)
    # the comparison has teeth: adapters change the outputs, peft saves both adapters
    assert not torch.allclose(expected["logits default"], expected["logits other"])
    assert not torch.allclose(expected["logits disabled"], expected["logits other"])
    assert not torch.allclose(expected["logits both"], expected["logits other"])
    assert len(expected["saved default"]) == 2 * LAYERS * len(DEFAULT_TARGETS)
    assert len(expected["saved other"]) == 2 * LAYERS * len(OTHER_TARGETS)
    assert not any("lora" in key for key in expected["state unloaded"])


def _count_op_calls(monkeypatch):
    calls = []
    op = fastvl_peft.lora_linear
    monkeypatch.setattr(fastvl_peft, "lora_linear", lambda *a, **k: calls.append(1) or op(*a, **k))
    return calls


def test_accelerated_layers_run_fastvl_exactly_when_one_plain_adapter_is_active(monkeypatch):
    """Per call, from the layer's state: fastvl's op on every layer with one active plain
    adapter, not merged, adapters enabled; peft's forward elsewhere. Layers stay peft's."""
    model = _two_adapter_llama(torch.float64, False, "torch")
    fastvl_peft.accelerate(model, backend="torch")
    calls = _count_op_calls(monkeypatch)
    default, other, both = (LAYERS * len(t) for t in (
        DEFAULT_TARGETS, OTHER_TARGETS, set(DEFAULT_TARGETS) & set(OTHER_TARGETS)))
    layers = [m for m in model.modules() if isinstance(m, PeftLoraLinear)]
    assert len(layers) == default + other - both
    assert all("forward" in layer.__dict__ for layer in layers)

    def op_calls(**kwargs):
        calls.clear()
        with torch.no_grad():
            model(input_ids=_ids(), **kwargs)
        return len(calls)

    assert op_calls() == default
    model.set_adapter("other")
    assert op_calls() == other
    with model.disable_adapter():
        assert op_calls() == 0
    model.base_model.set_adapter(["default", "other"])  # layers holding one of the two: fastvl
    assert op_calls() == default + other - 2 * both
    model.set_adapter("default")
    assert op_calls(adapter_names=["default", "other"]) == 0  # peft's mixed batch
    model.merge_adapter()
    assert op_calls() == 0
    model.unmerge_adapter()
    assert op_calls() == default
    model.add_adapter("dora", LoraConfig(r=2, lora_alpha=2, use_dora=True,
                                         target_modules=DEFAULT_TARGETS))
    model.set_adapter("dora")
    assert op_calls() == 0
    model.set_adapter("default")
    assert op_calls() == default
    hooked, base = [], model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    handle = base.register_forward_hook(lambda *args: hooked.append(1))
    assert op_calls() == default - 1 and hooked == [1]  # peft's forward calls the base layer
    handle.remove()

    assert len(fastvl_peft.restore(model)) == len(layers) and fastvl_peft.restore(model) == []
    assert not any("forward" in layer.__dict__ for layer in layers)
    assert op_calls() == 0


def test_accelerate_reports_the_current_state_and_restores_a_merged_model():
    model = _two_adapter_llama(torch.float64, False, "torch")
    layers = model.base_model.model.model.layers
    layers[0].self_attn.v_proj.merge()
    up = layers[1].mlp.up_proj
    others_forward = up.forward = functools.partial(PeftLoraLinear.forward, up)  # another patch
    report = fastvl_peft.accelerate(model)
    prefix = "base_model.model.model.layers."
    reasons = {n.removeprefix(prefix): r for n, _, r in report.skipped}
    assert "merged" in reasons["0.self_attn.v_proj"]
    assert "0 active adapters" in reasons["0.self_attn.k_proj"]  # holds "other" only
    assert "already replaced on the instance" in reasons["1.mlp.up_proj"]
    assert f"{prefix}0.self_attn.q_proj" in report.replaced
    targets = LAYERS * len(set(DEFAULT_TARGETS) | set(OTHER_TARGETS))
    assert len(report.replaced) + len(report.skipped) == targets
    with pytest.raises(ValueError, match="already accelerated"):
        fastvl_peft.accelerate(model)
    assert len(report.remove()) == targets - 1 and report.remove() == []  # merged or not
    assert layers[0].self_attn.v_proj.merged and up.forward is others_forward


def test_accelerated_op_gets_peft_scaling_and_dropout(monkeypatch):
    """rsLoRA scaling and the dropout probability reach fastvl's op; dropout only in training."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2)
    model = get_peft_model(LlamaForCausalLM(config).to(DEVICE), LoraConfig(
        r=4, lora_alpha=8, use_rslora=True, lora_dropout=0.25, target_modules=["q_proj"]))
    fastvl_peft.accelerate(model)
    seen, op = [], fastvl_peft.lora_linear
    monkeypatch.setattr(fastvl_peft, "lora_linear",
                        lambda *a, **k: seen.append((a[5], k["dropout_p"])) or op(*a, **k))
    model.train()(input_ids=_ids())
    model.eval()(input_ids=_ids())
    assert seen == [(8 / 2, 0.25)] * LAYERS + [(8 / 2, 0.0)] * LAYERS


def test_accelerated_layer_compiles_fullgraph_and_follows_its_state():
    """torch.compile re-decides when the layer's state changes (guards, no stale branch)."""
    model = _two_adapter_llama(torch.float64, False, "torch")
    fastvl_peft.accelerate(model)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj  # "default" and "other"
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    x = random_tensor(3, 5, 32, dtype=torch.float64, device=DEVICE, generator=_generator(6))
    changes = [lambda: None, lambda: layer.set_adapter("other"), layer.merge, layer.unmerge,
               lambda: layer.set_adapter(["default", "other"]),
               lambda: layer.set_adapter("default")]
    with torch.no_grad():
        for change in changes:
            change()
            torch.testing.assert_close(compiled(x), PeftLoraLinear.forward(layer, x),
                                       **CASES["torch"][1])
