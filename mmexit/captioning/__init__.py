"""Image captioning with per-token early exit: data, captioner, decoding, training, COCO metrics.

One file, one job:
- ``schema.py``       what a ``task: captioning`` recipe may contain (``CAPTIONING_SCHEMA``)
- ``scenes.py``       the generated scenes data set (COCO + Karpathy formats, deterministic by seed)
- ``coco_data.py``    Karpathy / COCO annotation loaders, input checks (``DataError``), image tensors
- ``tokenizer.py``    word-level tokenizer trained with ``tokenizers``, or GPT-2's from the hub
- ``model.py``        ``Captioner``: timm / HF ViT encoder + GPT2LMHeadModel (cross-attention) + exits
- ``decoding.py``     per-token early-exit greedy and beam search with a managed KV cache
- ``training.py``     joint weighted CE over exits (+ KL to the final exit), or two-stage
- ``calibration.py``  teacher-forced per-token statistics for BEEM / PCEE (and other) calibrations
- ``metrics.py``      pycocoevalcap BLEU / METEOR / ROUGE-L / CIDEr (+ SPICE on request)
- ``pipeline.py``     ``run_captioning``: train -> calibrate -> evaluate -> report

Choices mmexit makes (and where they are documented):
- exit heads: the decoder's ``ln_f`` + the shared LM head by default (``model.py``);
- calibration "correct" token: the full model's greedy token under teacher forcing by default,
  the reference token optionally (``calibration.py``);
- skipped layers' K/V: CALM state propagation by default; FREE-style deferred compute (exact
  cache, catch-up work counted in ``compute_speedup``); oracle as a simulated analysis mode
  (``decoding.py``);
- the saturation rule never stops at the first exit (no previous hidden state to compare with).
"""
