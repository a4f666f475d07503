"""Benchmark cases, one module per op; every module here is imported by
:func:`fastvl.bench.cases.all_cases`. Add an op's cases by adding a file."""
