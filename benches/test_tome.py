"""ToMe under pytest-benchmark: the merge step (fastvl backends vs a plain-PyTorch ToMe step)
and end-to-end timm ViT-B/16 / ViT-L/16 (unpatched timm vs plain-PyTorch ToMe vs
fastvl.patch.timm.apply_tome at r 8, 13, 16; ViT-L on GPU only).

The cases (shapes, dtypes, implementations) come from fastvl/bench/suites/tome.py;
benches/conftest.py parametrises this test over them. Each benchmark group is one workload;
for the ViT cases ``extra_info["items"]`` is the batch (images/s = items / time).
"""

OP = ("tome", "vit_tome")


def test_tome(benchmark, bench_impl):
    bench_impl(benchmark)
