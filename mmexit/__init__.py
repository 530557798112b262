"""mmexit: batched early-exit inference for transformers (text classification and captioning)."""

__version__ = "0.1.0"
