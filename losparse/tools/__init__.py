"""Tooling around the algorithm, not part of it: nothing in `losparse` outside this package imports it.

    benchmark            timing (interleaved, with a reliability verdict), sizes, linear-layer cost model,
                         built-in random-weight architectures and `compress_for_benchmark`
    inference_benchmark  dense vs compact inference (scripts/benchmark_inference.py)
    training_benchmark   Trainer vs LoSparseTrainer step time (scripts/benchmark_training.py)
    reproduce            the cells of the paper's tables and figures, run or printed (scripts/reproduce.py)
    results              finished runs (all_results.json) as flat records
    report               our runs beside the paper's tables, and the `python -m losparse.report` command
    plots                the paper's figures (matplotlib)
    paper_results        the paper's published numbers, as data

`reproduce`, `results`, `report` and `paper_results` import no torch.
"""
