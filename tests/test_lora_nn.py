"""fastvl.nn.LoRALinear / RoutedLoRALinear and fastvl.patch.peft.accelerate against peft.

A tiny random LLaMA (2 layers, hidden 64, never loaded weights) with peft LoRA on its
projections: logits and every LoRA gradient must equal peft's after ``accelerate`` (float32,
dropout 0; same math, so roundoff-level tolerance), state dicts load both ways, merge/unmerge
round-trips, layers fastvl cannot serve (DoRA, merged, several active adapters, embeddings)
stay peft's with the reason. The modules' own tests use small odd shapes.
"""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from peft.utils import get_peft_model_state_dict
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from fastvl.nn import LoRALinear, RoutedLoRALinear, lora_route
from fastvl.patch import peft as fastvl_peft
from fastvl.testing import random_tensor
from tests.conftest import DEVICE, require_backend


IN, OUT, RANK = 24, 19, 4
TIGHT = dict(rtol=1e-5, atol=1e-5) if DEVICE.type == "cpu" else dict(rtol=1e-4, atol=5e-5)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _generator(seed):
    return torch.Generator(device=DEVICE).manual_seed(seed)


def _base(seed=0, bias=True):
    torch.manual_seed(seed)
    return nn.Linear(IN, OUT, bias=bias, device=DEVICE)


def _randomize_b(module_or_tensor, seed=5):
    """peft and fastvl init B to zeros; tests need a non-zero adapter."""
    with torch.no_grad():
        for p in ([module_or_tensor] if isinstance(module_or_tensor, torch.Tensor) else
                  [p for n, p in module_or_tensor.named_parameters() if "lora_B" in n]):
            p.copy_(random_tensor(*p.shape, device=DEVICE, generator=_generator(seed)) * 0.1)


def _tiny_llama(seed=0):
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(DEVICE)


def _peft_llama(seed=0, **lora_kwargs):
    kwargs = dict(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0)
    model = get_peft_model(_tiny_llama(seed), LoraConfig(**{**kwargs, **lora_kwargs}))
    _randomize_b(model)
    return model


def _ids(seed=3, batch=2, tokens=11):
    return torch.randint(0, 128, (batch, tokens), generator=_generator(seed), device=DEVICE)


def _logits_and_lora_grads(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits
    logits.backward(random_tensor(*logits.shape, device=DEVICE, generator=_generator(9)))
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}
    return logits.detach(), grads


# ---------------------------------------------------------------- LoRALinear


def test_lora_linear_init_state_dict_and_forward():
    base = _base()
    module = LoRALinear(base, RANK, alpha=8, dropout=0.1)
    assert module.base_layer is base and module.scaling == 2.0
    assert set(module.state_dict()) == {"base_layer.weight", "base_layer.bias",
                                        "lora_A.default.weight", "lora_B.default.weight"}
    assert (module.weight_b == 0).all() and module.weight_a.abs().max() > 0
    bound = 1 / math.sqrt(IN)  # kaiming-uniform(a=√5) over fan_in
    assert module.weight_a.abs().max() <= bound
    assert LoRALinear(base, 4, 8, use_rslora=True).scaling == 4.0
    _randomize_b(module.weight_b)
    module.eval()
    x = random_tensor(3, 5, IN, device=DEVICE, generator=_generator(1))
    expected = base(x) + 2.0 * (x @ module.weight_a.t()) @ module.weight_b.t()
    torch.testing.assert_close(module(x), expected, **TIGHT)


def test_lora_linear_training_dropout_touches_only_the_adapter():
    module = LoRALinear(_base(), RANK, alpha=8, dropout=0.5)
    x = random_tensor(64, IN, device=DEVICE, generator=_generator(1))
    # B = 0: with dropout in training the output is still exactly the base output.
    torch.testing.assert_close(module.train()(x), module.base_layer(x))
    _randomize_b(module.weight_b)
    module.train()
    first, second = module(x), module(x)
    assert not torch.allclose(first, second)  # dropout is drawn per call in training mode
    torch.testing.assert_close(module.eval()(x), module.eval()(x))


def test_lora_linear_merge_unmerge_round_trip():
    base = _base()
    module = LoRALinear(base, RANK, alpha=8).eval()
    _randomize_b(module.weight_b)
    weight = base.weight.detach().clone()
    x = random_tensor(7, IN, device=DEVICE, generator=_generator(1))
    unmerged = module(x)
    module.merge()
    assert module.merged
    torch.testing.assert_close(module(x), unmerged, **TIGHT)
    torch.testing.assert_close(module(x), base(x))  # merged forward is the base alone
    with pytest.raises(RuntimeError, match="already merged"):
        module.merge()
    module.unmerge()
    torch.testing.assert_close(base.weight, weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(module(x), unmerged, **TIGHT)
    with pytest.raises(RuntimeError, match="not merged"):
        module.unmerge()


def test_lora_linear_state_dict_loads_both_ways_with_peft():
    config = LoraConfig(r=RANK, lora_alpha=8, target_modules=["proj"])
    peft_model = get_peft_model(_Wrapper(_base(seed=1)), config)
    peft_layer = peft_model.base_model.model.proj
    assert isinstance(peft_layer, PeftLoraLinear)
    _randomize_b(peft_layer, seed=6)
    module = LoRALinear(_base(seed=2), RANK, alpha=8).eval()
    module.load_state_dict(peft_layer.state_dict(), strict=True)
    x = random_tensor(5, IN, device=DEVICE, generator=_generator(1))
    torch.testing.assert_close(module(x), peft_layer(x), **TIGHT)
    _randomize_b(module.weight_b, seed=7)
    peft_layer.load_state_dict(module.state_dict(), strict=True)
    torch.testing.assert_close(peft_layer(x), module(x), **TIGHT)


class _Wrapper(nn.Module):
    def __init__(self, proj):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


def test_lora_linear_sharing_uses_the_given_modules():
    base, lora_a, lora_b = _base(), nn.Linear(IN, 3, bias=False), nn.Linear(3, OUT, bias=False)
    module = LoRALinear.sharing(base, lora_a, lora_b, 0.5, adapter_name="task")
    assert module.weight_a is lora_a.weight and module.weight_b is lora_b.weight
    assert module.r == 3 and module.scaling == 0.5
    assert set(module.state_dict()) == {"base_layer.weight", "base_layer.bias",
                                        "lora_A.task.weight", "lora_B.task.weight"}
    with pytest.raises(ValueError, match="lora_a"):
        LoRALinear.sharing(base, nn.Linear(IN + 1, 3, bias=False), lora_b, 0.5)
    with pytest.raises(ValueError, match="no bias"):
        LoRALinear.sharing(base, nn.Linear(IN, 3), lora_b, 0.5)
    with pytest.raises(TypeError, match="lora_a and lora_b"):
        LoRALinear.sharing(base, lora_a.weight, lora_b, 0.5)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(base=nn.Conv1d(3, 3, 1)), TypeError, "base must be a torch.nn.Linear"),
    (dict(r=0), ValueError, "r must be a positive int"),
    (dict(r=2.0), ValueError, "r must be a positive int"),
    (dict(alpha="8"), TypeError, "alpha must be"),
    (dict(dropout=1.0), ValueError, "dropout must be"),
    (dict(backend="cutlass"), ValueError, "backend must be 'auto' or one of"),
    (dict(adapter_name="a.b"), ValueError, "adapter_name"),
])
def test_lora_linear_bad_arguments(kwargs, error, match):
    args = dict(base=_base(), r=RANK, alpha=8)
    args.update(kwargs)
    base, r, alpha = args.pop("base"), args.pop("r"), args.pop("alpha")
    with pytest.raises(error, match=match):
        LoRALinear(base, r, alpha, **args)


# ---------------------------------------------------------------- RoutedLoRALinear


def _routed(num_adapters=3, seed=0):
    module = RoutedLoRALinear(_base(seed), RANK, alpha=8, num_adapters=num_adapters).eval()
    _randomize_b(module.lora_B)
    return module


def test_routed_lora_linear_matches_per_token_adapters():
    module = _routed()
    assert module.lora_A.shape == (3, RANK, IN) and module.lora_B.shape == (3, OUT, RANK)
    x = random_tensor(2, 7, IN, device=DEVICE, generator=_generator(1))
    route = torch.randint(-1, 3, (2, 7), generator=_generator(2), device=DEVICE)
    out = module(x, route)
    base = module.base_layer(x)
    for b in range(2):
        for n in range(7):
            e = route[b, n].item()
            delta = 0 if e < 0 else 2.0 * module.lora_B[e] @ (module.lora_A[e] @ x[b, n])
            torch.testing.assert_close(out[b, n], base[b, n] + delta, **TIGHT)


def test_routed_lora_linear_route_from_context_manager():
    module = _routed()
    x = random_tensor(5, IN, device=DEVICE, generator=_generator(1))
    route, other = (torch.tensor(r, device=DEVICE) for r in ([0, 1, 2, -1, 1], [2, 2, 0, 0, -1]))
    with pytest.raises(ValueError, match="no route"):
        module(x)
    with lora_route(route):
        torch.testing.assert_close(module(x), module(x, route))
        with lora_route(other):  # the innermost wins
            torch.testing.assert_close(module(x), module(x, other))
        torch.testing.assert_close(module(x), module(x, route))
    with pytest.raises(ValueError, match="no route"):
        module(x)
    with pytest.raises(TypeError, match="route must be a torch.Tensor"):
        with lora_route([0, 1]):
            pass


def _count_route_checks(monkeypatch):
    """A list that grows by one at every route range check (the one host sync)."""
    import fastvl.ops.lora as ops_lora

    calls, check = [], ops_lora._check_route_range
    monkeypatch.setattr(ops_lora, "_check_route_range",
                        lambda *a: calls.append(a[1]) or check(*a))
    return calls


def test_route_block_is_range_checked_once_per_adapter_count(monkeypatch):
    """Inside lora_route the route is checked (one host sync) at the first module of each
    adapter count, not at every layer; num_adapters= skips it; an explicit route is checked
    at every call; a bad route raises at every module, not just the first."""
    checks = _count_route_checks(monkeypatch)
    three, other_three, two = _routed(3), _routed(3, seed=1), _routed(2)
    x = random_tensor(5, IN, device=DEVICE, generator=_generator(1))
    route = torch.tensor([0, 1, -1, 1, 0], device=DEVICE)
    with lora_route(route):
        for _ in range(3):
            three(x), other_three(x), two(x)
    assert checks == [3, 2]
    with lora_route(route):  # a new block checks again
        three(x)
    with lora_route(route, num_adapters=3):  # known to fit 3 adapters: no check for those
        three(x), other_three(x), two(x)
    assert checks == [3, 2, 3, 2]
    three(x, route), three(x, route)
    assert checks == [3, 2, 3, 2, 3, 3]
    with lora_route(torch.tensor([0, 2, 2, 1, 0], device=DEVICE)):
        three(x)
        for _ in range(2):
            with pytest.raises(ValueError, match=r"route values must lie in \[-1, 2\)"):
                two(x)


def test_routed_lora_linear_peft_state_dict_round_trip():
    module, other = _routed(seed=0), _routed(seed=1)
    names = ["vision", "text", "audio"]
    state = module.to_peft_state_dict(names)
    assert set(state) == {"base_layer.weight", "base_layer.bias"} | {
        f"lora_{ab}.{n}.weight" for n in names for ab in "AB"}
    torch.testing.assert_close(state["lora_B.text.weight"], module.lora_B[1])
    other.load_peft_state_dict(state, names)
    for a, b in zip(module.state_dict().values(), other.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="missing keys"):
        other.load_peft_state_dict({k: v for k, v in state.items() if "audio" not in k}, names)
    with pytest.raises(ValueError, match="3 distinct"):
        module.to_peft_state_dict(["a", "a", "b"])
    with pytest.raises(ValueError, match="num_adapters must be a positive int"):
        RoutedLoRALinear(_base(), RANK, 8, num_adapters=0)


# ---------------------------------------------------------------- accelerate(peft model)


def test_accelerate_tiny_llama_logits_and_grads_equal_peft():
    model = _peft_llama()
    ids = _ids()
    expected_logits, expected_grads = _logits_and_lora_grads(model, ids)
    peft_state = get_peft_model_state_dict(model)
    params = dict(model.named_parameters())
    report = fastvl_peft.accelerate(model, backend="torch")
    assert len(report.replaced) == 2 * len(TARGETS) and report.skipped == []
    assert all(isinstance(model.get_submodule(n), PeftLoraLinear) for n in report.replaced)
    fast_layer = model.get_submodule(report.replaced[0])
    # same Parameter objects under the same names; peft's adapter state dict unchanged
    assert {n: id(p) for n, p in model.named_parameters()} == {n: id(p) for n, p in params.items()}
    with fastvl_peft.peft_layers(model) as names:  # peft finds adapters by module type
        assert names == report.replaced
        saved = get_peft_model_state_dict(model)
    assert saved.keys() == peft_state.keys() and model.get_submodule(names[0]) is fast_layer
    logits, grads = _logits_and_lora_grads(model, ids)
    torch.testing.assert_close(logits, expected_logits, **TIGHT)
    assert grads.keys() == expected_grads.keys() and len(grads) == 4 * len(TARGETS)
    for name in grads:
        torch.testing.assert_close(grads[name], expected_grads[name], **TIGHT, msg=name)
    assert "replaced" in str(report)
    assert len(report.remove()) == 2 * len(TARGETS) and report.remove() == []
    assert isinstance(model.get_submodule(report.replaced[0]), PeftLoraLinear)
    torch.testing.assert_close(model(input_ids=ids).logits, expected_logits, **TIGHT)


def _train(model, steps, seed=11):
    """``steps`` AdamW steps of next-token loss on one random batch: [(loss, {trainable
    parameter name: value})] after each step."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    ids = _ids(seed=seed, batch=2, tokens=12)
    history = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.append((loss.item(), {n: p.detach().clone()
                                      for n, p in model.named_parameters() if p.requires_grad}))
    return history


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_accelerate_trains_like_peft(backend):
    """Liger-style convergence: 5 AdamW steps of a tiny peft LLaMA with and without
    fastvl's layers give the same losses and LoRA parameters step by step."""
    require_backend("lora_linear", backend)
    expected = _train(_peft_llama().train(), steps=5)
    model = _peft_llama().train()
    fastvl_peft.accelerate(model, backend=backend)
    actual = _train(model, steps=5)
    for step, ((loss, params), (want_loss, want_params)) in enumerate(zip(actual, expected)):
        assert loss == pytest.approx(want_loss, rel=1e-5, abs=1e-6), f"step {step}"
        assert params.keys() == want_params.keys() and len(params) == 4 * len(TARGETS)
        for name, value in params.items():
            torch.testing.assert_close(value, want_params[name], rtol=1e-4, atol=1e-5,
                                       msg=f"step {step}: {name}")
    assert expected[-1][0] < expected[0][0]  # it does train


def test_accelerate_keeps_rslora_scaling_dropout_and_training_mode():
    model = _peft_llama(use_rslora=True, lora_dropout=0.25, target_modules=["q_proj"])
    model.train()
    fastvl_peft.accelerate(model)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, PeftLoraLinear) and layer.training  # scaling, dropout: test_patch_peft
    assert fastvl_peft.restore(model) and fastvl_peft.restore(model) == []


def test_accelerate_leaves_unsupported_layers_with_reasons():
    model = get_peft_model(_tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    model.add_adapter("dora", LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj"],
                                         use_dora=True))
    model.add_adapter("extra", LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj"]))
    model.add_adapter("embed", LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens"]))
    model.base_model.set_adapter(["default", "dora", "embed"])
    layers = model.base_model.model.model.layers
    layers[1].self_attn.q_proj.merge()  # default merged on layer 1
    report = fastvl_peft.accelerate(model)
    assert report.replaced == ["base_model.model.model.layers.0.self_attn.q_proj"]
    reasons = {name.removeprefix("base_model.model."): reason for name, _, reason in report.skipped}
    assert "DoRA" in reasons["model.layers.0.self_attn.v_proj"]
    assert "merged" in reasons["model.layers.1.self_attn.q_proj"]
    assert "0 active adapters" in reasons["model.layers.0.self_attn.k_proj"]
    assert "not a peft lora.Linear" in reasons["model.embed_tokens"]
    with pytest.raises(ValueError, match="already accelerated"):
        fastvl_peft.accelerate(model)
    report.remove()

    model.base_model.set_adapter(["default", "extra"])  # two adapters on no layer; add one
    layers[0].self_attn.q_proj.update_layer(
        "extra", 4, 8, config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    layers[0].self_attn.q_proj.set_adapter(["default", "extra"])
    report = fastvl_peft.accelerate(model)
    skipped = {name: reason for name, _, reason in report.skipped}
    assert "2 active adapters" in skipped["base_model.model.model.layers.0.self_attn.q_proj"]


def test_accelerate_needs_adapters_in_the_base_dtype():
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj"])
    upcast = get_peft_model(_tiny_llama().bfloat16(), LoraConfig(**config))  # peft: fp32 adapters
    report = fastvl_peft.accelerate(upcast)
    assert report.replaced == [] and len(report.skipped) == 2
    assert "autocast_adapter_dtype=False" in report.skipped[0].reason
    same = get_peft_model(_tiny_llama().bfloat16(), LoraConfig(**config),
                          autocast_adapter_dtype=False)
    assert len(fastvl_peft.accelerate(same).replaced) == 2


def test_accelerate_restore_merged_and_bad_arguments():
    model = _peft_llama(target_modules=["v_proj"])
    report = fastvl_peft.accelerate(model)
    layer = model.get_submodule(report.replaced[0])
    layer.merge()
    assert len(report.remove()) == 2 and layer.merged  # peft's own layer keeps its state
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        fastvl_peft.accelerate("model")
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        fastvl_peft.accelerate(model, backend="cutlass")
    with pytest.raises(ValueError, match="itself a peft LoRA layer"):
        fastvl_peft.accelerate(model.get_submodule(report.replaced[0]))


# ---------------------------------------------------------------- serve_adapters(peft model)

SERVED = ("math", "code")


def _two_adapter_llama(seed=0):
    """A tiny peft LLaMA with adapters "math" (r 4, alpha 8, q/v) and "code" (r 8, alpha 4,
    attention + down_proj): different ranks, scalings and target layers."""
    model = get_peft_model(_tiny_llama(seed), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), adapter_name="math")
    model.add_adapter("code", LoraConfig(r=8, lora_alpha=4, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]))
    _randomize_b(model)
    return model.eval()


def test_routed_lora_linear_stacked_per_adapter_scaling():
    base = _base()
    lora_a = random_tensor(2, RANK, IN, device=DEVICE, generator=_generator(1))
    lora_b = random_tensor(2, OUT, RANK, device=DEVICE, generator=_generator(2))
    module = RoutedLoRALinear.stacked(base, lora_a, lora_b, [0.5, 3.0])
    assert module.lora_A.data_ptr() == lora_a.data_ptr() and "scaling" not in module.state_dict()
    x = random_tensor(4, IN, device=DEVICE, generator=_generator(3))
    route = torch.tensor([1, 0, -1, 1], device=DEVICE)
    out = module(x, route)
    for n, e in enumerate(route.tolist()):
        delta = 0 if e < 0 else [0.5, 3.0][e] * lora_b[e] @ (lora_a[e] @ x[n])
        torch.testing.assert_close(out[n], base(x[n]) + delta, **TIGHT)
    assert "scaling=[0.5, 3.0]" in repr(module)
    with pytest.raises(ValueError, match="one float or E = 2"):
        RoutedLoRALinear.stacked(base, lora_a, lora_b, [1.0])
    with pytest.raises(ValueError, match=r"expected lora_a \(E, r, 24\)"):
        RoutedLoRALinear.stacked(base, lora_a[:, :, :5], lora_b, 1.0)
    with pytest.raises(ValueError, match="lora_b must be .*float64"):
        RoutedLoRALinear.stacked(base.double(), lora_a.double(), lora_b, 1.0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_serve_adapters_equals_peft_mixed_batch_and_generates(backend):
    """One adapter per sequence (and one sequence on the base model): logits equal peft's
    ``adapter_names=`` forward; greedy generation (prefill, then decode steps of 3 rows: the
    row path of the triton backend) gives peft's tokens."""
    require_backend("routed_lora_linear", backend)
    model = _two_adapter_llama()
    ids = _ids(batch=3, tokens=9)
    names = ["code", "__base__", "math"]
    with torch.no_grad():
        expected = model(input_ids=ids, adapter_names=names).logits
        expected_tokens = model.generate(input_ids=ids, adapter_names=names, max_new_tokens=3,
                                         do_sample=False, pad_token_id=0)
    patch = fastvl_peft.serve_adapters(model, SERVED, backend=backend)
    assert len(patch.replaced) == 2 * 5 and patch.skipped == []
    layer = model.get_submodule(patch.replaced[0])  # q_proj: both adapters, ranks 4 and 8
    assert isinstance(layer, RoutedLoRALinear) and layer.lora_A.shape[:2] == (2, 8)
    torch.testing.assert_close(layer.scaling, torch.tensor([2.0, 0.5], device=DEVICE))
    route = patch.route(names)
    assert route.tolist() == [[1], [-1], [0]]
    with torch.no_grad(), lora_route(route):
        logits = model(input_ids=ids).logits
        tokens = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False,
                                pad_token_id=0)
    torch.testing.assert_close(logits, expected, **TIGHT)
    torch.testing.assert_close(tokens, expected_tokens, rtol=0, atol=0)
    assert len(patch.remove()) == 10 and patch.remove() == []
    assert isinstance(model.get_submodule(patch.replaced[0]), PeftLoraLinear)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, adapter_names=names).logits, expected)


def test_serve_adapters_skips_with_reasons_and_rejects_bad_names():
    model = _two_adapter_llama()
    model.add_adapter("dora", LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj"],
                                         use_dora=True))
    model.add_adapter("other", LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj"]))
    layers = model.base_model.model.model.layers
    layers[1].self_attn.k_proj.merge(adapter_names=["code"])
    patch = fastvl_peft.serve_adapters(model, ("math", "code", "dora"))
    reasons = {n.removeprefix("base_model.model.model."): r for n, _, r in patch.skipped}
    assert "DoRA" in reasons["layers.0.self_attn.v_proj"]
    assert "merged" in reasons["layers.1.self_attn.k_proj"]
    assert "holds none of" in reasons["layers.0.mlp.gate_proj"]
    assert "layers.0.self_attn.q_proj" in {n.removeprefix("base_model.model.model.")
                                           for n in patch.replaced}
    with pytest.raises(ValueError, match="already accelerated or serving"):
        fastvl_peft.accelerate(model)
    with pytest.raises(ValueError, match=r"unknown adapters \['chat'\]"):
        patch.route(["math", "chat"])
    assert fastvl_peft.restore(model)
    with pytest.raises(ValueError, match=r"holds adapters \['chat'\]"):
        fastvl_peft.serve_adapters(model, ["math", "chat"])
    with pytest.raises(ValueError, match="distinct adapter names"):
        fastvl_peft.serve_adapters(model, ["math", "math"])
    with pytest.raises(TypeError, match="sequence of str"):
        fastvl_peft.serve_adapters(model, "math")


# ---------------------------------------------------------------- backends, autograd, compile


def _forward_and_grads(module, x, *args):
    x = x.detach().clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    out = module(x, *args)
    out.backward(random_tensor(*out.shape, dtype=out.dtype, device=DEVICE, generator=_generator(9)))
    return [out.detach(), x.grad] + [p.grad for p in module.parameters() if p.requires_grad]


@pytest.mark.parametrize("routed", [False, True], ids=["plain", "routed"])
def test_triton_backend_matches_torch_backend(routed):
    """The kernels run by the modules (interpreted on CPU) give the torch backend's result."""
    from tests.conftest import require_backend

    require_backend("routed_lora_linear" if routed else "lora_linear", "triton")
    module = _routed() if routed else LoRALinear(_base(), RANK, alpha=8).eval()
    if not routed:
        _randomize_b(module.weight_b)
    module.base_layer.requires_grad_(False)  # frozen base, as in LoRA training
    x = random_tensor(2, 5, IN, device=DEVICE, generator=_generator(1))
    args = (torch.randint(-1, 3, (2, 5), generator=_generator(2), device=DEVICE),) if routed else ()
    expected = _forward_and_grads(module, x, *args)
    module.backend = "triton"
    for actual, reference in zip(_forward_and_grads(module, x, *args), expected):
        torch.testing.assert_close(actual, reference, rtol=1e-4, atol=1e-5)


def test_modules_gradcheck_float64():
    def base():
        return nn.Linear(7, 5, dtype=torch.float64, device=DEVICE)

    plain = LoRALinear(base(), 3, alpha=6, backend="torch")
    routed = RoutedLoRALinear(base(), 3, alpha=6, num_adapters=2, backend="torch")
    _randomize_b(plain.weight_b)
    _randomize_b(routed.lora_B)
    x = random_tensor(4, 7, dtype=torch.float64, device=DEVICE, generator=_generator(1),
                      requires_grad=True)
    route = torch.tensor([1, -1, 0, 1], device=DEVICE)
    assert torch.autograd.gradcheck(lambda x, a, b: torch.func.functional_call(
        plain, {"lora_A.default.weight": a, "lora_B.default.weight": b}, (x,)),
        (x, plain.weight_a, plain.weight_b))
    assert torch.autograd.gradcheck(lambda x, a, b: torch.func.functional_call(
        routed, {"lora_A": a, "lora_B": b}, (x, route)), (x, routed.lora_A, routed.lora_B))


def test_modules_compile_fullgraph_with_context_route():
    plain = LoRALinear(_base(), RANK, alpha=8).eval()
    _randomize_b(plain.weight_b)
    x = random_tensor(3, 5, IN, device=DEVICE, generator=_generator(1))
    torch.testing.assert_close(torch.compile(plain, fullgraph=True)(x), plain(x), **TIGHT)
    routed = _routed()
    compiled = torch.compile(routed, fullgraph=True)
    for seed in (2, 3):  # a new route tensor under the same context must be used, not cached
        route = torch.randint(-1, 3, (3, 5), generator=_generator(seed), device=DEVICE)
        with lora_route(route):
            torch.testing.assert_close(compiled(x), routed(x, route), **TIGHT)


@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
def test_lora_route_entered_inside_compiled_function(compiler):
    """lora_route entered inside a function compiled with fullgraph=True, nested blocks too:
    each module call gets the innermost route (the float64 per-token formula, within TIGHT),
    and no block is left active afterwards."""
    from fastvl.nn.lora import active_route_block
    from tests.samples_lora import lora_reference

    torch._dynamo.reset()
    module = _routed()
    x = random_tensor(3, 5, IN, device=DEVICE, generator=_generator(1))

    def fn(x, route, other):
        with lora_route(route):
            first = module(x)
            with lora_route(other):
                inner = module(x)
            return first, inner, module(x)

    compiled = torch.compile(fn, fullgraph=True, backend=compiler)
    tensors = [t.detach().double() for t in (x, module.base_layer.weight, module.base_layer.bias,
                                              module.lora_A, module.lora_B)]
    for seed in (2, 3):  # new route tensors must be used, not cached
        route, other = (torch.randint(-1, 3, (3, 5), generator=_generator(seed + k),
                                      device=DEVICE) for k in (0, 10))
        first, inner, last = compiled(x, route, other)
        expected = [lora_reference(*tensors, 2.0, r) for r in (route, other, route)]
        for got, want in zip((first, inner, last), expected):
            torch.testing.assert_close(got.double(), want, **TIGHT)
        assert active_route_block() is None
