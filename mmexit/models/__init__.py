"""Multi-exit wrappers over Hugging Face backbones, exit heads and backbone loading."""
