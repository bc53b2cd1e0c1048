"""``raytp bench``'s per-rank part: reference models and PyTorch's TP plans, the workloads
and their FLOPs, the contenders, timing, and the report. Pure PyTorch (no Ray): the same
code runs in the Ray rank actors (:mod:`raytp.driver.bench`) and under ``torchrun``
(:mod:`raytp.bench.torchrun_entry`)."""
