"""mmexit: batched early-exit inference for transformers (text classification and captioning).

``mmexit.load(run_dir)`` gives a trained run's model with its calibrated rule at its chosen
operating point (``predict(texts)`` or ``caption(images)``).
"""

__version__ = "0.1.0"


def load(run_dir, rule=None, device=None):
    """A trained run folder -> a predictor (see ``mmexit.serve.predictor``)."""
    from mmexit.serve.load import load as load_run

    return load_run(run_dir, rule=rule, device=device)
