"""Exit decision rules: each reads one exit's outputs for a batch and returns a per-row stop mask."""
