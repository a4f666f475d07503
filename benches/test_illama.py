"""iLLaMA training steps under pytest-benchmark: :class:`fastvl.models.ILLaMAViT` at causal
strength 0.5, fastvl attention vs the plain-PyTorch soft mask (cases from
fastvl/bench/suites/illama.py, parametrised by benches/conftest.py; ``extra_info["items"]``
is the batch)."""

OP = "illama"


def test_illama(benchmark, bench_impl):
    bench_impl(benchmark)
