"""Using a trained run: the predictor (``mmexit.load``), ``mmexit predict`` and ``mmexit serve``."""
