"""PiToMe and Zero-TPrune under pytest-benchmark: PiToMe's energy (fastvl backends vs the
dense formulation) and end-to-end timm ViT-B/16 (unpatched timm vs the papers' plain-PyTorch
formulations vs ``fastvl.patch.timm.apply_pitome`` / ``apply_zero_tprune`` at r 8 and 16).

The cases come from fastvl/bench/suites/pitome.py and zero_tprune.py; benches/conftest.py
parametrises this test over them (``extra_info["items"]`` is the batch for the ViT cases).
"""

OP = ("pitome_energy", "vit_pitome", "vit_zero_tprune")


def test_token_reduction(benchmark, bench_impl):
    bench_impl(benchmark)
