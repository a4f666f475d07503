"""gather_tokens under pytest-benchmark: fastvl backends vs torch.gather and indexing.

The cases (shapes, dtypes, implementations) come from fastvl/bench/suites/gather_tokens.py;
benches/conftest.py parametrises this test over them. Each benchmark group is one workload.
"""

OP = "gather_tokens"


def test_gather_tokens(benchmark, bench_impl):
    bench_impl(benchmark)
