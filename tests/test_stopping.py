"""VI's early stopping and best state: BlackBIRDS' rule (the default) and the smoothed rule.

Every test runs on a scripted loss: epoch t's total is a number fixed in advance and its
gradient with respect to q's only parameter x is 1, so that plain SGD at lr 1 moves x from 0
to -k after k optimiser steps. The state of q therefore counts the steps taken, and a stored
state says exactly after which step it was copied.
"""

import math

import pytest
import torch

from gradcal import VI


class PointMass(torch.nn.Module):
    """A family with all its mass at x (D = 1): sample(n) = (x repeated n times, zeros)."""

    def __init__(self):
        super().__init__()
        self.x = torch.nn.Parameter(torch.zeros(1))

    def sample(self, n):
        return self.x.expand(n, 1), torch.zeros(n)


def scripted(totals):
    """A batched loss whose value at its k-th call is totals[k] and whose gradient is 1."""
    calls = []

    def loss(theta, data):
        value = totals[min(len(calls), len(totals) - 1)]
        calls.append(value)
        return value + (theta - theta.detach()).sum(-1)

    loss.batched = True
    return loss


def fit(totals, patience, n_epochs=100, **options):
    q = PointMass()
    vi = VI(
        scripted(totals),
        torch.distributions.Normal(torch.zeros(1), torch.ones(1)),
        q,
        w=0.0,  # the total is the scripted loss alone
        n_samples_per_epoch=2,
        optimizer=torch.optim.SGD(q.parameters(), lr=1.0),
        progress_bar=False,
        **options,
    )
    vi.run(torch.zeros(3), n_epochs, max_epochs_without_improvement=patience)
    return q, vi


def steps_of(state_or_q):
    """Optimiser steps taken before a state was copied (x = -steps)."""
    x = state_or_q["x"] if isinstance(state_or_q, dict) else state_or_q.x.detach()
    return -int(x.item())


# records at epochs 1, 2 and 4 (1-based); nothing lower afterwards
TOTALS = [5.0, 4.0, 6.0, 3.0, 7.0, 7.0, 7.0, 7.0, 7.0, 7.0]


def test_blackbirds_rule_stops_after_patience_epochs_without_a_lower_total():
    _q, vi = fit(TOTALS, patience=3)
    # the record of epoch 4 is followed by epochs 5, 6, 7 without improvement: stop after 7
    assert vi.losses_hist["total"] == TOTALS[:7]
    assert vi.best_loss == 3.0


def test_blackbirds_rule_keeps_q_after_the_step_of_the_record_epoch():
    _q, vi = fit(TOTALS, patience=3)
    # epoch 4 measured its total at the state after 3 steps; BlackBIRDS copies q after the
    # optimiser step of that epoch, i.e. after 4 steps
    assert steps_of(vi.best_estimator_state_dict) == 4


def test_every_epoch_steps_the_optimiser_and_q_is_left_in_its_last_state():
    q, _vi = fit(TOTALS, patience=3)
    # 7 epochs, 7 steps: the stopping epoch steps too; q is not reset to the best state
    assert steps_of(q) == 7


def test_blackbirds_rule_without_an_early_stop_runs_every_epoch():
    totals = [float(10 - k) for k in range(8)]  # improves every epoch
    q, vi = fit(totals, patience=2, n_epochs=8)
    assert len(vi.losses_hist["total"]) == 8
    assert steps_of(q) == 8 and steps_of(vi.best_estimator_state_dict) == 8
    assert "smoothed" not in vi.losses_hist  # BlackBIRDS' history keys (plus gradcal's dropped)


def test_a_zero_patience_stops_after_the_first_epoch_as_in_blackbirds():
    q, vi = fit(TOTALS, patience=0)
    assert vi.losses_hist["total"] == TOTALS[:1] and steps_of(q) == 1


def smoothed_by_definition(totals, window):
    """Bias-corrected exponential average written as a weighted sum (not as the recursion)."""
    beta = 1 - 2 / (window + 1)
    out = []
    for t in range(1, len(totals) + 1):
        weights = [(1 - beta) * beta ** (t - k) for k in range(1, t + 1)]
        out.append(sum(w * x for w, x in zip(weights, totals[:t], strict=True)) / sum(weights))
    return out


# one lucky epoch (2) early, then a slow steady decline the lucky value hides
LUCKY = [10.0, 6.0, 9.0, 8.0, 7.0, 6.5, 6.0, 5.0, 4.0, 3.5, 3.4, 3.3, 3.2, 3.3, 3.4, 3.5, 3.6]
LUCKY += [3.7, 3.8] + [4.0] * 20


def test_one_lucky_epoch_stops_blackbirds_rule_early():
    _q, vi = fit(LUCKY, patience=4)
    assert len(vi.losses_hist["total"]) == 6  # record at epoch 2, then 4 epochs without
    assert steps_of(vi.best_estimator_state_dict) == 2


def test_smoothed_rule_compares_the_bias_corrected_moving_average():
    q, vi = fit(LUCKY, patience=4, stopping="smoothed", smoothing_window=3)
    n = len(vi.losses_hist["total"])
    assert vi.losses_hist["total"] == pytest.approx(LUCKY[:n])  # float32 losses
    expected = smoothed_by_definition(vi.losses_hist["total"], 3)
    assert vi.losses_hist["smoothed"] == pytest.approx(expected, rel=1e-12)
    # stop: `patience` epochs after the last new minimum of the smoothed series
    best = min(range(n), key=expected.__getitem__)  # 0-based epoch of the lowest average
    assert n == best + 1 + 4
    assert vi.best_loss == pytest.approx(expected[best], rel=1e-12)
    # the best state is q after that epoch's step; every epoch stepped; q left last
    assert steps_of(vi.best_estimator_state_dict) == best + 1
    assert steps_of(q) == n
    # the lucky epoch does not end the run: it goes on through the decline to the bottom
    # (the smoothed minimum is at epoch 14, 0-based 13; computed by hand from LUCKY)
    assert (n, best) == (18, 13)


def test_smoothed_rule_skips_non_finite_totals():
    totals = [4.0, math.nan, 3.0, 5.0, 5.0, 5.0, 5.0]
    _q, vi = fit(totals, patience=3, stopping="smoothed", smoothing_window=3)
    smoothed = vi.losses_hist["smoothed"]
    assert math.isnan(smoothed[1])
    finite = [4.0, 3.0, 5.0, 5.0, 5.0]  # exact in float32
    assert [smoothed[0], *smoothed[2:]] == pytest.approx(smoothed_by_definition(finite, 3))
    assert len(smoothed) == 6  # the NaN epoch counts towards the patience: records 1 and 3


def test_a_window_of_one_is_blackbirds_rule():
    q, vi = fit(TOTALS, patience=3, stopping="smoothed", smoothing_window=1)
    assert vi.losses_hist["smoothed"] == vi.losses_hist["total"] == TOTALS[:7]
    assert steps_of(vi.best_estimator_state_dict) == 4 and steps_of(q) == 7


def test_resuming_a_run_that_stopped_takes_no_further_epoch(tmp_path):
    _q, vi = fit(
        LUCKY, patience=4, stopping="smoothed", smoothing_window=3, checkpoint_dir=tmp_path
    )
    n = len(vi.losses_hist["total"])
    q2, vi2 = fit(
        LUCKY,
        patience=4,
        stopping="smoothed",
        smoothing_window=3,
        checkpoint_dir=tmp_path,
        resume=True,
    )
    assert len(vi2.losses_hist["total"]) == n and steps_of(q2) == n
    assert vi2.best_loss == vi.best_loss


def test_resumed_smoothed_run_continues_the_same_average(tmp_path):
    _, straight = fit(LUCKY, patience=100, n_epochs=14, stopping="smoothed", smoothing_window=3)
    fit(
        LUCKY,
        patience=100,
        n_epochs=6,
        stopping="smoothed",
        smoothing_window=3,
        checkpoint_dir=tmp_path,
    )
    # the resumed run's loss restarts its script, so give it the remaining totals
    _q, resumed = fit(
        LUCKY[6:],
        patience=100,
        n_epochs=14,
        stopping="smoothed",
        smoothing_window=3,
        checkpoint_dir=tmp_path,
        resume=True,
    )
    assert resumed.losses_hist["smoothed"] == pytest.approx(straight.losses_hist["smoothed"])


@pytest.mark.parametrize(
    "options,message",
    [
        ({"stopping": "last"}, r"`stopping` must be one of \('blackbirds', 'smoothed'\)"),
        ({"smoothing_window": 0}, r"`smoothing_window` must be an int >= 1, got 0"),
        ({"smoothing_window": 2.5}, r"`smoothing_window` must be an int >= 1, got 2.5"),
    ],
)
def test_bad_stopping_options_are_rejected(options, message):
    q = PointMass()
    with pytest.raises(ValueError, match=message):
        VI(scripted([1.0]), torch.distributions.Normal(torch.zeros(1), 1.0), q, **options)
