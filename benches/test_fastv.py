"""FastV under pytest-benchmark: prefill of a LLaMA-shaped decoder with 576 image tokens,
transformers SDPA vs attn_implementation="fastvl" vs fastvl + apply_fastv.

The case comes from fastvl/bench/suites/fastv.py; benches/conftest.py parametrises this test
over it. On CUDA ``extra_info["peak_mem_bytes"]`` holds each implementation's peak memory.
"""

OP = "fastv"


def test_fastv(benchmark, bench_impl):
    bench_impl(benchmark)
