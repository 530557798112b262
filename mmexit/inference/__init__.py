"""Batched early-exit forward passes (encoders) and per-token early-exit decoding (captioning)."""
