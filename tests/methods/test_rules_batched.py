"""Every rule through the same paths: batched == one-by-one, simulated == measured, never-exit == full."""

from __future__ import annotations

import pytest
import torch

from methods_helpers import random_batch, tiny_model
from mmexit.calibration.statistics import ExitStatistics
from mmexit.calibration.beem import BEEMCalibration
from mmexit.calibration.pcee import PCEECalibration
from mmexit.inference.exit_loop import simulate_exits
from mmexit.exits.beem import BEEMRule
from mmexit.exits.confidence import EntropyRule, MaxProbRule, NeverExitRule
from mmexit.exits.energy import EnergyRule, normalized_energy
from mmexit.exits.patience import PatienceRule
from mmexit.exits.pcee import PCEERule
from mmexit.inference.encoder import early_exit_forward


def _calibration_data(model):
    """All-exit logits of a separate batch; labels = the exits' consensus (sum of probabilities)."""
    ids, mask = random_batch(96, seed=7)
    with torch.no_grad():
        logits = model.forward_exits(ids, mask)
    labels = logits.softmax(-1).sum(0).argmax(-1)
    return logits, labels


def _rules(model, batch):
    """One operating point per rule, chosen from the data so that exits spread over the layers."""
    ids, mask = batch
    with torch.no_grad():
        logits = model.forward_exits(ids, mask)  # [M, N, C]
    first = logits[0].float()
    conf = first.softmax(-1).amax(-1)
    log_p = first.log_softmax(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    energy = normalized_energy(first)
    calib_logits, calib_labels = _calibration_data(model)
    beem = BEEMRule(threshold=0.05)
    BEEMCalibration().fit(beem, ExitStatistics.from_logits(calib_logits, calib_labels, model.exit_layers))
    beem_c = BEEMRule(threshold=0.1, weights="cost", restart="zero")
    BEEMCalibration().fit(beem_c, ExitStatistics.from_logits(calib_logits, calib_labels, model.exit_layers))
    pcee = PCEERule(threshold=0.7, num_bins=4, min_bin_count=5)
    PCEECalibration().fit(pcee, ExitStatistics.from_logits(calib_logits, calib_labels, model.exit_layers))
    pcee_iso = PCEERule(threshold=0.7, num_bins=4, min_bin_count=5, binning="equal_width", smoothing="isotonic")
    PCEECalibration().fit(pcee_iso, ExitStatistics.from_logits(calib_logits, calib_labels, model.exit_layers))
    temperature = MaxProbRule(float(conf.median()))
    temperature.temperatures = [1.5, 1.0, 0.7, 1.0]
    return {
        "maxprob": MaxProbRule(float(conf.median())),
        "maxprob_T": temperature,
        "entropy": EntropyRule(float(entropy.median())),
        "energy": EnergyRule(float(energy.median())),
        "patience": PatienceRule(1),
        "beem_a": beem,
        "beem_c": beem_c,
        "pcee": pcee,
        "pcee_isotonic": pcee_iso,
    }


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def batch():
    return random_batch()


RULES = ["maxprob", "maxprob_T", "entropy", "energy", "patience", "beem_a", "beem_c", "pcee", "pcee_isotonic"]


@pytest.fixture(scope="module")
def rules(model, batch):
    return _rules(model, batch)


@pytest.mark.parametrize("name", RULES)
def test_batched_equals_one_by_one_and_simulated(model, batch, rules, name):
    rule = rules[name]
    ids, mask = batch
    batched = early_exit_forward(model, rule, ids, mask)
    single_exits, single_logits = [], []
    for row in range(ids.shape[0]):
        out = early_exit_forward(model, rule, ids[row:row + 1], mask[row:row + 1])
        single_exits.append(int(out.exit_index[0]))
        single_logits.append(out.logits[0])
    assert batched.exit_index.tolist() == single_exits
    torch.testing.assert_close(batched.logits, torch.stack(single_logits), atol=1e-5, rtol=1e-4)
    assert batched.logits.argmax(-1).tolist() == torch.stack(single_logits).argmax(-1).tolist()
    with torch.no_grad():
        all_logits = model.forward_exits(ids, mask)
    assert simulate_exits(rule, all_logits).tolist() == batched.exit_index.tolist()
    layers = torch.tensor(model.exit_layers)[batched.exit_index]
    assert batched.layers_used.tolist() == layers.tolist()


@pytest.mark.parametrize("name", ["maxprob", "entropy", "energy", "patience", "beem_a", "pcee"])
def test_exits_spread(model, batch, rules, name):
    """The chosen operating points actually exercise early exits (otherwise the tests above are vacuous)."""
    out = early_exit_forward(model, rules[name], *batch)
    assert int(out.exit_index.min()) < model.num_exits - 1


@pytest.mark.parametrize(
    "make",
    [
        lambda rules: NeverExitRule(),
        lambda rules: MaxProbRule(1.01),
        lambda rules: EntropyRule(0.0),
        lambda rules: EnergyRule(0.0),
        lambda rules: PatienceRule(99),
        lambda rules: rules["beem_a"].with_threshold(-2.0),
        lambda rules: rules["pcee"].with_threshold(1.01),
    ],
    ids=["never", "maxprob", "entropy", "energy", "patience", "beem", "pcee"],
)
def test_never_exit_equals_full_model(model, batch, rules, make):
    ids, mask = batch
    out = early_exit_forward(model, make(rules), ids, mask)
    with torch.no_grad():
        full = model.forward_full(ids, mask)
    assert out.exit_index.tolist() == [model.num_exits - 1] * ids.shape[0]
    assert out.layers_used.tolist() == [model.num_layers] * ids.shape[0]
    torch.testing.assert_close(out.logits, full, atol=1e-5, rtol=1e-4)


def test_with_threshold_works_for_every_sweep_point(rules, model, batch):
    with torch.no_grad():
        all_logits = model.forward_exits(*batch)
    for name in ("beem_a", "beem_c", "pcee", "pcee_isotonic"):
        for point in rules[name].default_sweep():
            exits = simulate_exits(rules[name].with_threshold(point), all_logits)
            assert exits.shape == (batch[0].shape[0],)
