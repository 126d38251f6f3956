"""The end-to-end S-DPO step benchmark (``benchmarks/bench_step.py``), one module per idea:

    shapes      model configurations (explicit dicts, no network), the data series and presets, the
                groups of one optimizer step in both layouts
    methods     the paper's approach (a), the paper's layout with a fused linear CE (b), sdpo_fast (c)
    microbatch  one optimizer step through micro-batches and gradient accumulation, OOM detection,
                the search for the largest micro-batch that fits, CUDA graphs of (c)'s micro-batches
    sweep       checks against (a), timing in turns, the sweep over cells, the summary
    report      JSON, markdown and the plot
    cli         arguments and ``main``
"""
