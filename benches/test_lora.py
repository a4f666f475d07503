"""LoRA under pytest-benchmark (issue #6): one LoRA linear (fastvl backends vs peft's
lora.Linear vs F.linear + addmm vs the base linear alone) and routed LoRA (a 50/50
vision/text split vs PLoRA-style boolean indexing; a 32-token decode step over 16 adapters vs
a gather + bmm implementation).

The cases (shapes, dtypes, implementations) come from fastvl/bench/suites/lora.py;
benches/conftest.py parametrises this test over them.
"""

OP = ("lora_linear", "routed_lora_linear")


def test_lora(benchmark, bench_impl):
    bench_impl(benchmark)
