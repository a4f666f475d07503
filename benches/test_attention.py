"""attention and attention_key_mass under pytest-benchmark: fastvl vs SDPA (each backend),
FlexAttention, xformers / flash-attn when installed; key mass vs a materialised softmax.

The cases (shapes, dtypes, implementations) come from fastvl/bench/suites/attention.py;
benches/conftest.py parametrises this test over them. Each benchmark group is one workload.
The attention_key_mass cases exist once fastvl has that op.
"""

OP = ("attention", "attention_key_mass")


def test_attention(benchmark, bench_impl):
    bench_impl(benchmark)
