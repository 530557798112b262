"""``mmexit bench``: the speed benchmarks, one module per job (``cli.py`` is the command line).

text (early exit vs full model on a text run or recipe), caption (step-synchronous and continuous
caption decoding: a run's rule, or fixed exit patterns), speculative (exact self-speculative
decoding: a captioning run, or a causal LM on plain text), engine (the serving engines in process),
load (an ``mmexit serve`` server over HTTP), precision (one text run at several dtypes). Timing goes
through ``mmexit.evaluation.timing.time_alternating`` (BENCHMARKS.md).
"""
