"""The layer-level continuous caption decoder (``mmexit.inference.continuous_decoder``) against
step-synchronous greedy decoding, on tiny random GPT-2 (cross-attention) and LLaMA (image prefix,
RoPE, grouped-query attention) captioners.

Each image's tokens and layers per token equal ``greedy_decode`` on the image alone (batch 1,
``propagate``) for rules that stop rows at different layers (stateless max-prob, stateful patience,
saturation that reads hidden states and no logits), whatever the slot count, arrival order, late
submissions and scheduler settings (age bound, depth bias, catch-up, restart weight); each token's exit logits and every K/V
a token reads equal the batch-1 stepper's up to float noise; the full model equals
``greedy_decode(rule=None)``; a finished row's slot is reused; rows at different caption positions
share layer calls.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "llama"))  # llama_testing

from llama_testing import EOS as LLAMA_EOS, llama_spec  # noqa: E402
from mmexit_testing import one_torch_thread  # noqa: E402
from mmexit.exits.confidence import MaxProbRule  # noqa: E402
from mmexit.exits.patience import PatienceRule  # noqa: E402
from mmexit.exits.saturation import SaturationRule  # noqa: E402
from mmexit.inference.continuous_decoder import ContinuousDecoder, continuous_greedy_decode  # noqa: E402
from mmexit.inference.decoder_layer_runner import DecoderLayerRunner  # noqa: E402
from mmexit.inference.scheduler import SchedulerSettings  # noqa: E402
from mmexit.inference.search import greedy_decode  # noqa: E402
from mmexit.inference.stepper import CachedStepper  # noqa: E402
from mmexit.models.captioner import build_captioner  # noqa: E402

MAX_LEN = 10
BOS = 1
IMAGES = 6
#: per family: EOS id, rules (each stops tokens at several layers on these tiny models)
FAMILIES = {
    "gpt2": (2, {"maxprob": MaxProbRule(0.5), "patience": PatienceRule(1), "saturation": SaturationRule(0.8)}),
    "llama": (LLAMA_EOS, {"maxprob": MaxProbRule(0.4), "patience": PatienceRule(1), "saturation": SaturationRule(0.8)}),
}
RULES = ["maxprob", "patience", "saturation"]
NO_AGE_BOUND = 10**9
#: scheduler settings (max_wait, depth_bias, catch_up, restart_weight): the default; the earlier default
#: (no catch-up term); oldest queue first; fullest queue first with a short age bound; deepest queue
#: first (step-synchronous sweeps); fullest with no age bound; catch-up and held restarts dominating
SCHEDULERS = {name: SchedulerSettings(*values) for name, values in {
    "default": (None, 1.0, 1.0, 0.5), "depth_bias_2.5": (None, 2.5, 0.0, 1.0), "oldest": (0, 1.0, 1.0, 0.5),
    "fullest_wait2": (2, 0.0, 0.0, 1.0), "deepest": (NO_AGE_BOUND, 1e9, 0.0, 1.0),
    "fullest_unbounded": (NO_AGE_BOUND, 0.0, 0.0, 1.0), "catch_up": (NO_AGE_BOUND, 0.0, 10.0, 0.1)}.items()}


_one_thread = pytest.fixture(autouse=True)(one_torch_thread)


@pytest.fixture(scope="module")
def models(make_spec) -> dict:
    """family -> (captioner, features [IMAGES, patches, width], eos id): tests/captioning's tiny GPT-2
    captioner and tests/llama's tiny LLaMA one."""
    built = {}
    for family, spec in (("gpt2", make_spec()), ("llama", llama_spec())):
        eos = FAMILIES[family][0]
        torch.manual_seed(0)
        model = build_captioner(spec).eval()
        torch.manual_seed(1)
        with torch.inference_mode():
            features = model.encode(torch.randn(IMAGES, 3, 32, 32))
        built[family] = (model, features, eos)
    return built


@torch.inference_mode()
def alone(model, features, rule, eos: int) -> dict:
    """greedy_decode of one image (batch 1, propagate), replayed through a batch-1 ``CachedStepper``
    for its exit logits [n, vocab] and cache."""
    result = greedy_decode(model, features[None], rule, MAX_LEN, BOS, eos, "propagate")
    tokens, layers = result.tokens[0], result.token_layers[0]
    stepper = CachedStepper(model, features[None], rule, MAX_LEN, "propagate")
    logits = []
    for t, token in enumerate([BOS] + tokens[:-1]):
        step_logits, step_layers = stepper.step(torch.tensor([token]), t)
        assert int(step_layers[0]) == layers[t]
        logits.append(step_logits[0].float())
    return {"tokens": tokens, "layers": layers, "logits": torch.stack(logits), "cache": stepper.cache}


@pytest.fixture(scope="module")
def references(models) -> dict:
    """(family, rule name or None) -> per image: ``alone``'s result."""
    table = {}
    for family, (model, features, eos) in models.items():
        rules = {None: None, **FAMILIES[family][1]}
        for name, rule in rules.items():
            table[family, name] = [alone(model, features[i], rule, eos) for i in range(IMAGES)]
    return table


def check_captions(captions, expected, logits_tolerance: float = 1e-5) -> None:
    """Tokens and layers exactly, exit logits with a tolerance."""
    for caption, reference in zip(captions, expected):
        assert caption.done
        assert caption.tokens == reference["tokens"]
        assert caption.layers == reference["layers"]
        torch.testing.assert_close(torch.stack(caption.logits), reference["logits"], atol=logits_tolerance,
                                   rtol=logits_tolerance)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("rule_name", RULES)
def test_rules_stop_rows_at_different_layers(models, references, family, rule_name):
    """The premise of the exactness tests: tokens exit at three or more layers, captions differ in length."""
    model = models[family][0]
    layers = [layer for reference in references[family, rule_name] for layer in reference["layers"]]
    assert len(set(layers)) >= 3 and min(layers) < model.num_layers
    assert len({len(reference["tokens"]) for reference in references[family, rule_name]}) >= 2


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("rule_name", RULES)
@pytest.mark.parametrize("slots", [1, 2, 4, IMAGES])
@pytest.mark.parametrize("scheduler", SCHEDULERS, ids=list(SCHEDULERS))
def test_each_row_equals_greedy_alone(models, references, family, rule_name, slots, scheduler):
    model, features, eos = models[family]
    rule = FAMILIES[family][1][rule_name]
    decoder = ContinuousDecoder(model, rule, MAX_LEN, slots, BOS, eos, scheduler=SCHEDULERS[scheduler],
                                keep_logits=True)
    ids = decoder.submit(features)
    captions = decoder.run()
    check_captions([captions[i] for i in ids], references[family, rule_name])
    assert decoder.in_flight == 0 and not decoder.busy


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("rule_name", ["maxprob", "patience", None])
@pytest.mark.parametrize("slots,max_call", [(IMAGES, 2), (4, 3), (IMAGES, 1)])
def test_a_pool_deeper_than_a_call_equals_greedy_alone(models, references, family, rule_name, slots, max_call,
                                                       monkeypatch):
    """scheduler.max_call < slots: no call takes more than max_call tokens, and every row is still exact."""
    model, features, eos = models[family]
    rule = FAMILIES[family][1][rule_name] if rule_name else None
    decoder = ContinuousDecoder(model, rule, MAX_LEN, slots, BOS, eos, scheduler=SchedulerSettings(max_call=max_call),
                                keep_logits=True)
    sizes = []
    original = decoder.runner.run
    monkeypatch.setattr(decoder.runner, "run", lambda index, rows: (sizes.append(len(rows)), original(index, rows))[1])
    ids = decoder.submit(features)
    captions = decoder.run()
    assert max(sizes) == max_call and decoder.in_flight == 0
    if rule_name:
        check_captions([captions[i] for i in ids], references[family, rule_name])
    else:
        full = greedy_decode(model, features, None, MAX_LEN, BOS, eos, "propagate")
        assert [captions[i].tokens for i in ids] == full.tokens


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("order", [[5, 4, 3, 2, 1, 0], [2, 0, 5, 1, 3, 4]], ids=["reversed", "shuffled"])
def test_arrival_order_and_images_submitted_while_decoding(models, references, family, order):
    """Images arrive in another order, half of them after decoding started; each row is unchanged."""
    model, features, eos = models[family]
    rule = FAMILIES[family][1]["maxprob"]
    decoder = ContinuousDecoder(model, rule, MAX_LEN, 3, BOS, eos, keep_logits=True)
    first = decoder.submit(features[order[:3]])
    for _ in range(7):
        decoder.step()
    assert decoder.busy and decoder.in_flight > 0
    later = decoder.submit(features[order[3:]])
    captions = decoder.run()
    expected = references[family, "maxprob"]
    check_captions([captions[i] for i in first + later], [expected[i] for i in order])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("slots", [1, 4, IMAGES])
def test_full_model_equals_greedy_full(models, references, family, slots):
    model, features, eos = models[family]
    full = greedy_decode(model, features, None, MAX_LEN, BOS, eos)
    result = continuous_greedy_decode(model, features, None, MAX_LEN, BOS, eos, slots=slots)
    assert result.tokens == full.tokens
    assert result.token_layers == full.token_layers
    assert torch.equal(result.layers, full.layers) and torch.equal(result.exit_index, full.exit_index)
    decoder = ContinuousDecoder(model, None, MAX_LEN, slots, BOS, eos, keep_logits=True)
    ids = decoder.submit(features)
    captions = decoder.run()
    check_captions([captions[i] for i in ids], references[family, None])
    assert decoder.row_layers == model.num_layers * sum(len(tokens) for tokens in full.tokens)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_every_kv_a_token_reads_equals_the_row_alone(models, references, family):
    """One slot per image (no reuse): each slot's K/V equal the batch-1 stepper's wherever a token
    wrote or read them: the image prefix, and caption position i at layer m when token i ran layer m
    or a later token did (then token i's K/V there were propagated if it skipped the layer). K/V a
    later token never reads are never propagated (a row that finished drops them)."""
    model, features, eos = models[family]
    rule = FAMILIES[family][1]["maxprob"]
    decoder = ContinuousDecoder(model, rule, MAX_LEN, IMAGES, BOS, eos)
    ids = decoder.submit(features)
    captions = decoder.run()
    compared = 0
    for image, reference in zip(ids, references[family, "maxprob"]):
        caption, cache, mine_cache = captions[image], reference["cache"], decoder.runner.cache
        for layer in range(model.num_layers):
            for mine, theirs in ((mine_cache.keys, cache.keys), (mine_cache.values, cache.values)):
                torch.testing.assert_close(mine[layer][caption.slot, :, :cache.offset],
                                           theirs[layer][0, :, :cache.offset], atol=1e-5, rtol=1e-5)
            for i in range(len(caption.tokens)):
                if layer >= max(caption.layers[i:]):
                    continue
                position = cache.offset + i
                for mine, theirs in ((mine_cache.keys, cache.keys), (mine_cache.values, cache.values)):
                    torch.testing.assert_close(mine[layer][caption.slot, :, position], theirs[layer][0, :, position],
                                               atol=1e-5, rtol=1e-5)
                compared += layer >= caption.layers[i]  # a propagated entry
    assert compared > 0
    assert not decoder.runner.unpropagated


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_finished_rows_slot_is_reused(models, references, family):
    model, features, eos = models[family]
    rule = FAMILIES[family][1]["maxprob"]
    decoder = ContinuousDecoder(model, rule, MAX_LEN, 2, BOS, eos, keep_logits=True)
    ids = decoder.submit(features)
    most_in_flight = 0
    while decoder.step():
        most_in_flight = max(most_in_flight, decoder.in_flight)
    captions = [decoder.results[i] for i in ids]
    assert most_in_flight == 2
    assert {caption.slot for caption in captions} == {0, 1}
    assert decoder.runner.cache.keys[0].shape[0] == 2  # the pool holds 2 rows for 6 images
    check_captions(captions, references[family, "maxprob"])  # stale K/V of a slot's earlier image never leak


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_rows_at_different_positions_share_layer_calls(models, monkeypatch, family):
    """The point of the decoder: one layer call serves tokens of different caption positions."""
    model, features, eos = models[family]
    adapter, calls = model.adapter, []
    original = adapter.step_rows

    def spy(index, hidden, cache, rows, positions, length=None):
        calls.append((index, positions.tolist()))
        return original(index, hidden, cache, rows, positions, length)

    monkeypatch.setattr(adapter, "step_rows", spy)
    decoder = ContinuousDecoder(model, FAMILIES[family][1]["maxprob"], MAX_LEN, 3, BOS, eos)
    decoder.submit(features)
    decoder.run()
    assert decoder.calls == len(calls)
    assert any(len(set(positions)) > 1 for _, positions in calls)
    assert decoder.row_layers == sum(len(positions) for _, positions in calls)


@pytest.mark.parametrize("policy", ["deferred", "oracle", "nonsense"])
def test_other_policies_are_refused(models, policy):
    model = models["gpt2"][0]
    with pytest.raises(ValueError, match="propagate"):
        ContinuousDecoder(model, MaxProbRule(0.5), MAX_LEN, 2, policy=policy)


def test_llama_project_kv_takes_a_position_per_row(models):
    """project_kv with positions [n] == project_kv at each row's int position (RoPE per row)."""
    model = models["llama"][0]
    adapter = model.adapter
    torch.manual_seed(4)
    hidden = torch.randn(3, adapter.width)
    positions = torch.tensor([4, 9, 6])
    with torch.inference_mode():
        keys, values = adapter.project_kv(1, hidden, positions)
        for row, position in enumerate(positions.tolist()):
            key, value = adapter.project_kv(1, hidden[row:row + 1], position)
            torch.testing.assert_close(keys[row:row + 1], key)
            torch.testing.assert_close(values[row:row + 1], value)


def test_bench_tool_on_a_tiny_random_captioner():
    """mmexit bench caption random: four decoders, the continuous captions equal the
    step-synchronous ones, early exit runs fewer layers per token than the full model."""
    import json
    import subprocess

    repo = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-m", "mmexit.runner", "bench", "caption", "random", "--width", "32", "--layers", "4",
         "--heads", "2", "--vocab", "30", "--images", "6", "--rows", "3", "--max-len", "6", "--repeats", "1",
         "--json"], capture_output=True, text=True, cwd=repo, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    rows = {row["decoder"]: row for row in report["rows_table"]}
    assert set(rows) == {"step-sync full", "step-sync exit", "continuous full", "continuous exit"}
    assert rows["continuous exit"]["same_captions"] == rows["step-sync exit"]["same_captions"] == 6
    assert rows["step-sync full"]["row_layer_speedup"] == rows["continuous full"]["row_layer_speedup"] == 1.0
    assert rows["continuous exit"]["row_layer_speedup"] == rows["step-sync exit"]["row_layer_speedup"] > 1.0


def test_images_of_another_shape_are_refused(models):
    model, features, _ = models["gpt2"]
    decoder = ContinuousDecoder(model, None, MAX_LEN, 2)
    decoder.submit(features[:2])
    with pytest.raises(ValueError, match="same patches"):
        decoder.submit(features[:1, :2])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_admissions_across_staged_batches(models, references, family, monkeypatch):
    """Prefix K/V are computed for up to ``slots`` waiting images at once (staged); an
    admission that takes the last staged images and the first of the next batch (it happens at some
    of these slot counts) gives each image its own, and every row still equals greedy decoding alone."""
    model, features, eos = models[family]
    crossings = []
    original = DecoderLayerRunner.admit

    def spy(self, slots, items, upcoming):
        crossings.append(0 < self.staged_left < len(slots))
        return original(self, slots, items, upcoming)

    monkeypatch.setattr(DecoderLayerRunner, "admit", spy)
    expected = references[family, "maxprob"]
    for slots in (2, 3, 4, 5):
        decoder = ContinuousDecoder(model, FAMILIES[family][1]["maxprob"], MAX_LEN, slots, BOS, eos, keep_logits=True)
        ids = decoder.submit(torch.cat([features, features, features]))  # 18 images: image i is image i % 6
        captions = decoder.run()
        check_captions([captions[i] for i in ids], [expected[i % IMAGES] for i in range(len(ids))])
        assert decoder.runner.staged is None and not decoder.waiting
    assert any(crossings)


@pytest.mark.parametrize("rule_name", [None, "maxprob", "saturation"])
def test_cross_attention_kv_computed_once_per_image_and_layer_it_reaches(models, references, rule_name, monkeypatch):
    """A layer's cross-attention K/V of an image are computed when its first token reaches that layer
    (for the rows of that call), once per image and layer, never for a layer no token of it runs; the
    captions still equal greedy decoding alone (slots are refilled, so stale K/V would show)."""
    model, features, eos = models["gpt2"]
    rule = None if rule_name is None else FAMILIES["gpt2"][1][rule_name]
    adapter, computed = model.adapter, []
    original = adapter.init_cache_layer

    def spy(index, image_features):
        computed.append((index, image_features.shape[0]))
        return original(index, image_features)

    monkeypatch.setattr(adapter, "init_cache_layer", spy)
    decoder = ContinuousDecoder(model, rule, MAX_LEN, 3, BOS, eos, keep_logits=True)
    ids = decoder.submit(features)
    captions = decoder.run()
    per_layer = [sum(n for index, n in computed if index == layer) for layer in range(model.num_layers)]
    reached = [sum(max(captions[i].layers) > layer for i in ids) for layer in range(model.num_layers)]
    assert per_layer == reached  # once per image for each layer its deepest token ran
    if rule_name is None:
        check_captions([captions[i] for i in ids], references["gpt2", None])
        assert per_layer == [IMAGES] * model.num_layers
    else:
        check_captions([captions[i] for i in ids], references["gpt2", rule_name])
    if rule_name == "saturation":
        assert per_layer[-1] < IMAGES  # some image never reached the last layer: its K/V there never computed


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("rule_name", ["maxprob", "saturation"])
def test_state_propagation_folded_into_calls_or_not(models, references, family, rule_name, monkeypatch):
    """The K/V of skipped layers are projected inside the next call of that layer that reads them
    (``step_rows.takes_folded``), or by ``project_kv`` before it for a ``step_rows`` that does not
    take folded rows (here a wrapper without the attribute): the same captions either way."""
    model, features, eos = models[family]
    adapter, folded = model.adapter, []
    assert adapter.step_rows.takes_folded
    original = adapter.step_rows

    def counting(index, hidden, cache, rows, positions, length=None):
        folded.append(cache.folded is not None)
        return original(index, hidden, cache, rows, positions, length)

    counting.takes_folded = True
    for step_rows in (counting, lambda *args: original(*args)):
        monkeypatch.setattr(adapter, "step_rows", step_rows)
        decoder = ContinuousDecoder(model, FAMILIES[family][1][rule_name], MAX_LEN, 3, BOS, eos, keep_logits=True)
        ids = decoder.submit(features)
        captions = decoder.run()
        check_captions([captions[i] for i in ids], references[family, rule_name])
        assert decoder.runner.cache.folded is None and not decoder.runner.unpropagated
    assert any(folded)


@pytest.mark.parametrize("uniform", [False, True])
def test_rows_plan_writes_and_reads_as_the_generic_path(models, uniform):
    """SlotCache.write_rows_and_read with a plan (flat index_copy_ writes, additive mask from the table,
    None when every row sits at the same position) == the generic per-row path (index_put, bool mask)."""
    from mmexit.models.kv_cache import DecoderCache
    from mmexit.models.slot_cache import SlotCache

    adapter = models["llama"][0].adapter
    torch.manual_seed(5)
    slots, positions = [3, 0, 2], ([4, 4, 4] if uniform else [4, 7, 5])
    caches = [SlotCache(adapter, 4, 2, MAX_LEN, torch.float32, torch.device("cpu")) for _ in range(2)]
    for cache in caches[1:]:
        for layer in range(adapter.num_layers):
            cache.keys[layer].copy_(caches[0].keys[layer].normal_())
            cache.values[layer].copy_(caches[0].values[layer].normal_())
    key, value = torch.randn(2, 3, adapter.num_kv_heads, adapter.head_dim)
    rows, at = torch.tensor(slots), torch.tensor(positions)
    expected = DecoderCache.write_rows_and_read(caches[0], 1, rows, at, key, value)
    plan = caches[1].plan_rows(slots, positions)
    got = caches[1].write_rows_and_read(1, plan.rows, plan.positions, key, value, plan.length)
    assert plan.length == max(positions) + 1
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    for mine, theirs in ((caches[1].keys, caches[0].keys), (caches[1].values, caches[0].values)):
        assert all(torch.equal(a, b) for a, b in zip(mine, theirs))
    if uniform:
        assert got[2] is None and bool(expected[2].all())
    else:
        assert torch.equal(got[2] == 0, expected[2]) and bool(torch.isinf(got[2][~expected[2]]).all())
    other = caches[1].write_rows_and_read(1, rows, at, key, value)  # not the plan's tensors: the generic path
    assert other[2].dtype == torch.bool


def test_a_subset_plan_equals_the_plan_of_those_rows(models):
    """RowsPlan.subset (the rows that go on after an exit keep their plan) reads and writes what a plan
    built for those rows alone does; its length stays the parent's, past a row's own position masked."""
    from mmexit.models.slot_cache import SlotCache

    adapter = models["llama"][0].adapter
    torch.manual_seed(6)
    slots, positions, keep = [3, 0, 2, 1], [4, 7, 5, 6], [0, 2]
    caches = [SlotCache(adapter, 4, 2, MAX_LEN, torch.float32, torch.device("cpu")) for _ in range(2)]
    for layer in range(adapter.num_layers):
        caches[1].kv[layer].copy_(caches[0].kv[layer].normal_())
    kv = torch.randn(len(keep), 2, adapter.num_kv_heads, adapter.head_dim)
    alone = caches[0].plan_rows([slots[j] for j in keep], [positions[j] for j in keep])
    subset = caches[1].plan_rows(slots, positions).subset(torch.tensor(keep))
    caches[1].plan = subset
    assert torch.equal(subset.rows, alone.rows) and torch.equal(subset.positions, alone.positions)
    assert torch.equal(subset.flat, alone.flat) and subset.length == max(positions) + 1 > alone.length
    expected = caches[0].write_kv_rows_and_read(1, alone.rows, alone.positions, kv, alone.length)
    got = caches[1].write_kv_rows_and_read(1, subset.rows, subset.positions, kv, subset.length)
    assert torch.equal(caches[0].kv[1], caches[1].kv[1])
    for mine, theirs in zip(got[:2], expected[:2]):
        assert torch.equal(mine[..., :alone.length, :], theirs)
    assert torch.equal(got[2][..., :alone.length], expected[2]) and bool(torch.isinf(got[2][..., alone.length:]).all())


def test_pending_kv_of_finished_rows_are_dropped_and_bounded(models):
    """Tokens that stop at the first exit leave K/V to propagate at every deeper layer, which no row
    ever runs: a finished row's entries are marked and the lists of such layers stay bounded
    (dead groups compacted) however many images go through; nothing live is left at the end."""
    from mmexit.exits.confidence import FixedExitRule

    model, features, eos = models["gpt2"]
    many = features.repeat(12, 1, 1)  # 72 images through 2 slots
    decoder = ContinuousDecoder(model, FixedExitRule(0), MAX_LEN, 2, BOS, -1)  # every caption MAX_LEN tokens
    decoder.submit(many)
    runner, longest = decoder.runner, 0
    while decoder.step():
        longest = max(longest, *(len(pending) for pending in runner.pending[1:]))
    assert len(decoder.results) == many.shape[0]
    assert all(caption.layers == [1] * MAX_LEN for caption in decoder.results.values())
    # live groups: at most slots x MAX_LEN (one per stopped token of the rows in flight); a list is
    # compacted at twice that: bounded, where 72 x MAX_LEN groups would pile up without compaction
    assert 0 < longest <= 2 * 2 * MAX_LEN + 1
    assert not runner.unpropagated and not any(runner.slot_groups)
