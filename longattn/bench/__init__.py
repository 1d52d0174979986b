"""`longattn bench`'s measuring code: a model under eager PyTorch, plain torch.compile and
torch.compile(backend="longattn") by each policy, at several lengths.

    run.py      the loop: Variant, Workload, Settings, run_bench -> one row of metrics per (length, variant)
    measure.py  time (CUDA events or perf_counter; warm-up, then the median of repeats) and peak memory of a call
    report.py   the environment record, the table, and bench.json / bench.md / bench.png

Nothing is imported here, so that `import longattn.bench.report` does not load torch.
"""
