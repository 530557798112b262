"""Beam search's no-repeat n-gram option: the bans are the n-grams a beam already holds, a beam
never repeats one, and off it decodes exactly as before."""

from __future__ import annotations

import torch

from mmexit.inference.search import beam_decode, repeated_ngram_bans


def test_bans_are_the_tokens_that_would_repeat_an_ngram():
    histories = [[5, 6, 5], [5, 6, 7, 5, 6], [3], [4, 4]]
    assert repeated_ngram_bans(histories, 2) == ([0, 1, 3], [6, 7, 4])  # "5 6" seen; "6 7" seen; "4 4" seen
    assert repeated_ngram_bans(histories, 3) == ([1], [7])  # "5 6 7" seen, ends in "5 6"
    assert repeated_ngram_bans(histories, 1) == ([0, 0, 1, 1, 1, 2, 3], [5, 6, 5, 6, 7, 3, 4])  # any token seen


def ngrams(tokens: list[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def test_beam_search_never_repeats_an_ngram_and_is_unchanged_when_off(tiny_captioner, tiny_features):
    model, features = tiny_captioner, tiny_features
    plain = beam_decode(model, features, None, 3, 16, 1, 2)
    off = beam_decode(model, features, None, 3, 16, 1, 2, no_repeat_ngram=0)
    assert off.tokens == plain.tokens
    repeats = [row for row in plain.tokens if len(set(ngrams(row, 2))) < len(ngrams(row, 2))]
    assert repeats  # the random model does repeat bigrams: the option has something to remove
    blocked = beam_decode(model, features, None, 3, 16, 1, 2, no_repeat_ngram=2)
    for row in blocked.tokens:
        assert len(set(ngrams(row, 2))) == len(ngrams(row, 2)), row


def test_a_negative_size_is_refused_naming_the_key():
    import pytest

    from mmexit.errors import RecipeError
    from mmexit.recipe import load_recipe, validate_recipe

    from pathlib import Path

    recipe = load_recipe(Path(__file__).resolve().parents[2] / "recipes" / "caption_quickstart.yaml",
                         ["evaluate.no_repeat_ngram=-1"])
    with pytest.raises(RecipeError, match=r"evaluate\.no_repeat_ngram.*>= 0"):
        validate_recipe(recipe)
