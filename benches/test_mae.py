"""MAE pretraining under pytest-benchmark: one training step (forward + backward + AdamW) of
fastvl.models.MaskedAutoencoderViT, fused=True vs the plain-PyTorch path (VideoMAE V2's dual
masking included), and the decoder input alone (``unshuffle_with_mask_token``, every fastvl
backend vs MAE's cat + gather).

The cases come from fastvl/bench/suites/mae.py; benches/conftest.py parametrises this test
over them. On CUDA ``extra_info["peak_mem_bytes"]`` holds each implementation's peak memory.
"""

OP = ("mae", "unshuffle_with_mask_token")


def test_mae(benchmark, bench_impl):
    bench_impl(benchmark)
