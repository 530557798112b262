"""mmexit: batched early-exit inference for transformers (text classification and captioning).

``mmexit.load(run_dir)`` gives a trained run's model with its calibrated rule at its chosen
operating point (``predict(texts)`` or ``caption(images)``).
"""

import os

__version__ = "0.1.0"

# transformers 5.x swaps some layers for kernels fetched from the Hugging Face hub at load time and
# refuses to load a model where an incompatible `kernels` package is installed ("Kernels are not
# available", seen on a CUDA image). mmexit runs the layers itself, offline: hub kernels stay off
# unless the user sets USE_HUB_KERNELS.
os.environ.setdefault("USE_HUB_KERNELS", "NO")


def load(run_dir, rule=None, device=None):
    """A trained run folder -> a predictor (see ``mmexit.serve.predictor``)."""
    from mmexit.serve.load import load as load_run

    return load_run(run_dir, rule=rule, device=device)
