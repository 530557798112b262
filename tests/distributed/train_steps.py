"""Launched by test_multiprocess.py (plain python or torchrun): train a tiny model with the one
trainer and write, per rank, the weights and the logged history.

    python train_steps.py TASK OUT BATCH_SIZE    (TASK: text | caption)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # mmexit_testing, read by the captioning conftest
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "captioning"))

from mmexit.training.joint import JointLoss  # noqa: E402
from mmexit.training.trainer import train_stage  # noqa: E402

TRAIN = {"batch_size": 8, "weight_decay": 0.01, "warmup_ratio": 0.25, "max_grad_norm": 1.0, "log_every": 1,
         "grad_accum": 1, "max_steps": None, "head_lr": None, "lr_schedule": "linear"}


def text_setup(batch_size: int):
    from mmexit.data.examples import TextExample
    from mmexit.data.text import Collator, LengthGroupedBatches
    from mmexit.models.encoder import MultiExitEncoder
    from mmexit.models.loading import load_tokenizer, tiny_backbone

    torch.manual_seed(0)
    model = MultiExitEncoder(tiny_backbone("tiny:bert"), 2, "all", head_dropout=0.0)
    model.backbone.config.hidden_dropout_prob = 0.0
    words = ["good", "bad", "film", "plot", "great", "dull", "actor", "scene"]
    generator = torch.Generator().manual_seed(1)
    examples = [TextExample(" ".join(words[i] for i in torch.randint(0, 8, (6,), generator=generator).tolist()),
                            None, int(n % 2)) for n in range(64)]
    sampler = LengthGroupedBatches(examples, batch_size, seed=0)
    return model, examples, Collator(load_tokenizer("tiny:bert"), 16), sampler


def caption_setup(batch_size: int):
    from conftest import tiny_spec

    from mmexit.data.caption_batches import CaptionCollator, CaptionPairs
    from mmexit.models.captioner import build_captioner

    class Tokenizer:
        bos_id, eos_id, pad_id = 1, 2, 0

    torch.manual_seed(0)
    spec = tiny_spec()
    spec["decoder"]["config"]["resid_pdrop"] = spec["decoder"]["config"]["embd_pdrop"] = 0.0
    spec["decoder"]["config"]["attn_pdrop"] = 0.0
    model = build_captioner(spec)
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(16, 3, 32, 32, generator=generator)
    captions = [[torch.randint(3, 30, (5,), generator=generator).tolist() for _ in range(2)] for _ in range(16)]
    return model, CaptionPairs(images, captions), CaptionCollator(images, Tokenizer(), 8), None


def main() -> None:
    task, out, batch_size = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    accelerator = Accelerator(cpu=True)
    torch.set_num_threads(1)
    model, dataset, collate, sampler = (text_setup if task == "text" else caption_setup)(batch_size)
    train = dict(TRAIN, batch_size=batch_size)
    history = train_stage(model, JointLoss(), dataset, collate, accelerator, train, epochs=2.0, lr=1e-3, seed=0,
                          stage_name="train", batch_sampler=sampler)
    rank = accelerator.process_index
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().clone().contiguous() for k, v in accelerator.unwrap_model(model).state_dict().items()}
    save_file(weights, str(out / f"rank{rank}.safetensors"))
    (out / f"history{rank}.json").write_text(json.dumps(history))


if __name__ == "__main__":
    main()
