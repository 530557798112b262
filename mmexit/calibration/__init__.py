"""Calibration: setting a rule's parameters on a held-out split."""
