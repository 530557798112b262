"""A trained LoRA captioner copied as its difference from the pretrained sources
(``mmexit.models.weights_delta``, ``tools/weights_delta.py``): only what training changed travels,
the rebuilt weights file is byte-identical, and a source that converts differently is refused."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from llama_testing import BOS, VOCAB, llama_spec

from mmexit.errors import ModelLoadError
from mmexit.models.captioner import build_captioner, load_captioner, save_captioner
from mmexit.models.weights_delta import apply_delta, export_delta

pytest.importorskip("peft")

REPO = Path(__file__).resolve().parents[2]
LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "targets": ["q_proj", "v_proj"]}


def trained_run(tmp_path: Path, pretrained: str) -> Path:
    """A run folder (model/ + recipe.yaml) of a frozen 'pretrained' LLaMA with LoRA, a trained
    MLP projection and adapter exits; the random timm encoder is not pretrained."""
    spec = llama_spec(exit_head="adapter")
    spec["encoder"]["freeze"] = True
    spec["decoder"] = {"type": "llama", "pretrained": pretrained, "freeze": True, "lora": LORA}
    spec["projection"] = "mlp"
    torch.manual_seed(5)  # another seed than the reference's rebuild: the random encoder differs
    model = build_captioner(spec)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    images = torch.randn(2, 3, 32, 32)
    ids = torch.cat([torch.full((2, 1), BOS), torch.randint(6, VOCAB, (2, 5))], dim=1)
    for _ in range(2):
        logits = model(images, ids)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 2), torch.roll(ids, -1, 1).repeat(
            logits.shape[0], 1).flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    run = tmp_path / "run"
    save_captioner(model.eval(), run / "model")
    recipe = {"task": "captioning", "model": {"encoder": {"pretrained": False}, "decoder": {"pretrained": pretrained}}}
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return run


@pytest.fixture()
def pretrained(tiny_llama_lm, tmp_path) -> str:
    folder = tmp_path / "hf"
    tiny_llama_lm.save_pretrained(folder)
    return str(folder)


def test_only_trained_tensors_travel_and_the_rebuilt_file_is_identical(pretrained, tmp_path):
    run = trained_run(tmp_path, pretrained)
    manifest = export_delta(run, tmp_path / "delta", shard_mib=0.01)
    changed = set(manifest["changed"])
    decoder_changed = {name for name in changed if name.startswith("decoder.")}
    assert decoder_changed and all(name.endswith(("q_proj.weight", "v_proj.weight")) for name in decoder_changed)
    assert any(name.startswith("projection.") for name in changed)
    assert any(name.startswith("exit_modules.") for name in changed)
    assert any(name.startswith("encoder.") for name in changed)  # not pretrained: its random weights travel
    assert not any("embed_tokens" in name or "mlp" in name for name in decoder_changed)
    assert len(manifest["shards"]) > 1  # sharded at the requested size

    copy = tmp_path / "copy"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("model.safetensors"))
    apply_delta(copy, tmp_path / "delta")
    original = (run / "model" / "model.safetensors").read_bytes()
    assert (copy / "model" / "model.safetensors").read_bytes() == original
    images = torch.randn(1, 3, 32, 32)
    ids = torch.tensor([[BOS, 7, 8]])
    with torch.inference_mode():
        assert torch.equal(load_captioner(copy / "model")(images, ids), load_captioner(run / "model")(images, ids))


def test_a_source_that_converts_differently_is_refused_by_name(pretrained, tmp_path):
    run = trained_run(tmp_path, pretrained)
    export_delta(run, tmp_path / "delta")
    from transformers import LlamaForCausalLM

    changed_source = LlamaForCausalLM.from_pretrained(pretrained)
    with torch.no_grad():
        changed_source.model.layers[0].mlp.up_proj.weight.add_(1e-3)
    changed_source.save_pretrained(pretrained)
    copy = tmp_path / "copy"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"layers\.0\.mlp\.up_proj\.weight: rebuilt bytes differ"):
        apply_delta(copy, tmp_path / "delta")
    assert not (copy / "model" / "model.safetensors").exists()  # nothing half-written


def test_the_command_line_reports_a_missing_manifest_in_one_line(tmp_path):
    import subprocess

    (tmp_path / "run" / "model").mkdir(parents=True)
    result = subprocess.run([sys.executable, str(REPO / "tools" / "weights_delta.py"), "apply", str(tmp_path / "run"),
                             str(tmp_path / "nothing")], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'nothing'}: no delta.json (written by export_delta)"]
