"""Asynchronous steering (graceq.steering) against the literal recipe: scikit-learn refits of each
member and the literal Kriging-Believer batch."""

import numpy as np
import pytest
from sklearn.linear_model import Ridge

from graceq import campaign as cp
from graceq import steering
from graceq.acquisition import kriging_believer
from graceq.config import settings_from_dict
from graceq.model import CommitteeRidge


def _data(seed=0, n=120, p=30):
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n, 5))
    X = np.abs(latent @ rng.normal(size=(5, p))) / 5 + 0.05 * rng.random((n, p))
    y = X @ rng.normal(size=p) / np.sqrt(p) + 0.1 * np.sin(latent[:, 0])
    return X, y


def _committee(X, y, rows, test_rows):
    model = CommitteeRidge(n_members=16, alphas=np.logspace(-6, 1, 8), random_state=5).fit(X[rows], y[rows])
    return model.calibrate(X[test_rows], y[test_rows])


def test_rows_added_to_every_member_equal_scikit_learn_refits():
    X, y = _data()
    model = _committee(X, y, np.arange(40), np.arange(40, 50))
    extra = np.arange(60, 66)
    updated = steering.with_rows(model, X[extra], y[extra])
    for i, subset in enumerate(model.subsets_):
        ridge = Ridge(alpha=model.alpha_).fit(np.vstack([X[:40][subset], X[extra]]),
                                              np.concatenate([y[:40][subset], y[extra]]))
        np.testing.assert_allclose(updated.coef_[i], ridge.coef_, rtol=1e-6, atol=1e-9)
        assert abs(updated.intercept_[i] - ridge.intercept_) < 1e-8
    assert updated.calibration_ == model.calibration_ and updated.alpha_ == model.alpha_
    assert steering.with_rows(model, X[:0], y[:0]) is model


def test_a_pending_job_believed_at_its_mean_continues_the_literal_kriging_believer_batch():
    """KB picks p1, believes it at its predicted mean, picks p2: with p1 pending, the steering
    committee must pick p2 as its next structure."""
    X, y = _data(seed=1)
    model = _committee(X, y, np.arange(40), np.arange(40, 50))
    candidates = np.arange(50, len(X))
    best = float(y[:50].min())
    p1, p2 = kriging_believer(model, X, candidates, best, 0.2, 2, method="literal")
    believed = steering.with_rows(model, X[[p1]], model.predict(X[[p1]]))
    rest = candidates[candidates != p1]
    assert kriging_believer(believed, X, rest, best, 0.2, 1, method="literal")[0] == p2


def _view_and_settings(n=120, labelled=50):
    X, y = _data(seed=2, n=n)
    n_atoms = np.full(n, 4)
    energy_ff = np.zeros(n)
    results = {i: ("converged", float(y[i] * 4)) for i in range(labelled)}  # delta per atom = y
    view = cp.CampaignView(n_atoms=n_atoms, energy_ff=energy_ff, atoms_per_molecule=4,
                           picks=list(range(labelled)), results=results)
    # EI with the Kriging-Believer: the acquisition whose picks the believed pending jobs must move
    settings = settings_from_dict({"campaign": {"pool": "pool.extxyz", "window": 0.5, "n_batch": 3,
                                                "acquisition": "ei"}})
    return X, y, view, settings


def test_with_nothing_pending_the_arrival_decision_is_the_batch_decision():
    X, y, view, settings = _view_and_settings()
    model = _committee(X, y, np.arange(40), np.arange(40, 50))
    batch = cp.decide(view, model, X, settings, 7)
    arrival = steering.decide_on_arrival(view, model, X, settings, 7, fitted_rows=range(50), pending=[],
                                         free_slots=3)
    np.testing.assert_array_equal(arrival.picks, batch.picks)
    assert arrival.stop == batch.stop and dict(arrival.stats.to_json(), n_pending=None) == dict(batch.stats.to_json(), n_pending=None)


def test_results_since_the_fit_and_pending_jobs_change_the_next_picks_deterministically():
    X, y, view, settings = _view_and_settings(labelled=50)
    model = _committee(X, y, np.arange(40), np.arange(40, 45))   # fitted before rows 45..49 arrived
    first = steering.decide_on_arrival(view, model, X, settings, 1, range(45), pending=[], free_slots=2)
    assert first.stop is None and len(first.picks) == 2
    sent = cp.CampaignView(view.n_atoms, view.energy_ff, 4, view.picks + first.picks.tolist(), view.results)
    again = steering.decide_on_arrival(sent, model, X, settings, 2, range(45), pending=first.picks, free_slots=2)
    assert len(again.picks) == 2 and not set(again.picks) & set(first.picks)
    replay = steering.decide_on_arrival(sent, model, X, settings, 2, range(45), pending=first.picks, free_slots=2)
    np.testing.assert_array_equal(again.picks, replay.picks)
    assert again.stats.n_reference_calls == 52 and again.stats.n_pending == 2
    # the pending jobs are believed: a committee that ignores them picks otherwise
    ignoring = steering.decide_on_arrival(sent, model, X, settings, 2, range(45), pending=[], free_slots=2)
    assert list(again.picks) != list(ignoring.picks)
    # the stop check counts the pending jobs as unmeasured: p_conv is that of before they were sent
    assert again.stats.p_conv == first.stats.p_conv


def test_the_budget_counts_pending_jobs_and_no_slot_means_no_pick():
    X, y, view, settings = _view_and_settings(labelled=50)
    model = _committee(X, y, np.arange(40), np.arange(40, 50))
    capped = settings.model_copy(update={"campaign": settings.campaign.model_copy(update={"budget": 52})})
    sent = cp.CampaignView(view.n_atoms, view.energy_ff, 4, view.picks + [60, 61], view.results)
    decision = steering.decide_on_arrival(sent, model, X, capped, 3, range(50), pending=[60, 61], free_slots=4)
    assert decision.stop == "budget" and len(decision.picks) == 0
    idle = steering.decide_on_arrival(sent, model, X, settings, 3, range(50), pending=[60, 61], free_slots=0)
    assert idle.stop is None and len(idle.picks) == 0


def test_before_the_first_fit_farthest_points_keep_every_slot_busy():
    due = steering.farthest_points_due
    # slots > n_init: the initial batch and its continuation fill the slots; one more per arrival
    assert [due(20, 32, m, 264) for m in (0, 1, 19, 20, 50)] == [32, 33, 51, 51, 51]
    # slots <= n_init: the initial batch alone (the model's first picks use the calls better)
    assert [due(20, 8, m, 264) for m in (0, 12, 13, 19, 30)] == [20, 20, 20, 20, 20]
    assert due(20, 20, 5, 264) == 20
    # in flight (picks - arrivals) is never below the slots before the first fit, pool and budget permitting
    assert all(due(20, 32, m, 264) - m >= 32 for m in range(20))
    assert due(20, 32, 5, 30) == 30 and due(20, 32, 5, 264, budget=25) == 25 and due(20, 32, 0, 264, budget=10) == 20


def test_the_continuation_of_farthest_point_sampling_keeps_the_initial_batch_first():
    X, _ = _data(seed=3)
    energy = np.arange(len(X), dtype=float)
    first = cp.initial_batch(X, energy, 12)
    longer = cp.initial_batch(X, energy, steering.farthest_points_due(12, 20, 3, len(X)))
    assert len(longer) == 23
    np.testing.assert_array_equal(longer[:12], first)


def test_the_span_of_the_picks_holds_every_pick_exactly_and_adds_nothing_for_a_repeat():
    X, _ = _data(seed=3, n=80, p=200)
    span = steering.Span(X).cover([5, 9, 2])
    assert span.r == 3 and span.rows == [5, 9, 2]
    span.cover([9, 11, 12]).cover([30])
    assert span.rows == [5, 9, 2, 11, 12, 30] and span.r == 6
    np.testing.assert_allclose(span.Q.T @ span.Q, np.eye(6), atol=1e-12)
    rows = np.array(span.rows)
    np.testing.assert_allclose(span.Z[rows] @ span.Q.T + span.shift, X[rows], atol=1e-12)
    np.testing.assert_allclose(span.Z, (X - X.mean(axis=0)) @ span.Q, atol=1e-12)
    twin = np.vstack([X, X[[5]] + X[[9]] - X.mean(axis=0)])   # a row inside the span already
    assert steering.Span(twin).cover([5, 9, 80]).r == 2


def _span_settings(acquisition):
    settings = _view_and_settings()[3]
    return settings.model_copy(update={"campaign": settings.campaign.model_copy(update={"acquisition": acquisition})})


def test_a_decision_in_the_span_of_the_picks_is_the_decision_in_the_features():
    """Fewer coordinates, same arithmetic: the pending jobs believed, the results since the fit
    added, the stop check and the picks agree with the decision made on the full features."""
    X, y = _data(seed=4, n=300, p=400)
    n_atoms, labelled = np.full(len(X), 4), 60
    results = {i: ("converged", float(y[i] * 4)) for i in range(labelled)}
    pending = [100, 150, 201]
    view = cp.CampaignView(n_atoms=n_atoms, energy_ff=np.zeros(len(X)), atoms_per_molecule=4,
                           picks=list(range(labelled)) + pending, results=results)
    model = _committee(X, y, np.arange(40), np.arange(40, 50))   # rows 50..59 arrived since the fit
    # EI's Kriging-Believer believes its first pick for the second: in the span with one free slot only
    for acquisition, slots in (("ei", 1), ("p_window", 3), ("greedy", 2)):
        settings = _span_settings(acquisition)
        full = steering.decide_on_arrival(view, model, X, settings, 5, range(50), pending, free_slots=slots)
        span = steering.Span(X)
        reduced = steering.decide_on_arrival(view, model, X, settings, 5, range(50), pending, free_slots=slots,
                                             span=span)
        assert span.r == 40 + 10 + len(pending) and span.useful and len(full.picks) == slots  # train, new, pending
        np.testing.assert_array_equal(reduced.picks, full.picks)
        np.testing.assert_allclose(reduced.mu, full.mu, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(reduced.sigma, full.sigma, rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(reduced.pick_ei, full.pick_ei, rtol=1e-6, atol=1e-12)
        a, b = reduced.stats.to_json(), full.stats.to_json()
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], float):
                assert np.isclose(a[key], b[key], rtol=1e-7, atol=1e-12), key
            else:
                assert a[key] == b[key], key


def test_a_batch_believed_within_the_decision_is_made_in_the_features():
    X, y = _data(seed=4, n=300, p=400)
    results = {i: ("converged", float(y[i] * 4)) for i in range(60)}
    view = cp.CampaignView(n_atoms=np.full(len(X), 4), energy_ff=np.zeros(len(X)), atoms_per_molecule=4,
                           picks=list(range(60)), results=results)
    model = _committee(X, y, np.arange(40), np.arange(40, 50))
    settings = _span_settings("ei")
    full = steering.decide_on_arrival(view, model, X, settings, 5, range(50), [], free_slots=3)
    span = steering.Span(X)
    again = steering.decide_on_arrival(view, model, X, settings, 5, range(50), [], free_slots=3, span=span)
    assert span.r == 0
    np.testing.assert_array_equal(again.pick_ei, full.pick_ei)


def test_the_span_refuses_a_committee_fitted_on_other_rows():
    X, y = _data(seed=4, n=300, p=400)
    model = _committee(X, y, np.arange(40), np.arange(40, 50))
    span = steering.Span(X).cover(range(60))
    span.committee(model, range(40))
    with pytest.raises(ValueError, match="training rows"):
        span.committee(model, range(1, 41))


def test_the_bordered_update_makes_the_decision_member_refits_make(monkeypatch):
    """The decision borders the fit's factorised member systems with the rows since the fit and the
    pending jobs; with the systems over their memory cap it refits every member instead (the
    literal recipe): same committees, same picks, same stop statistics."""
    from graceq import model as model_module
    from graceq.model import member_systems

    X, y, view, settings = _view_and_settings(labelled=50)
    fitted = _committee(X, y, np.arange(40), np.arange(40, 45))   # rows 45..49 arrived since the fit
    pending = [70, 90, 110]
    sent = cp.CampaignView(view.n_atoms, view.energy_ff, 4, view.picks + pending, view.results)
    bordered = steering.decide_on_arrival(sent, fitted, X, settings, 3, range(45), pending, free_slots=2)
    assert member_systems(fitted) is not None
    believed = steering.believed_committee(sent, fitted, X, range(45), pending, member_systems(fitted))
    monkeypatch.setattr(model_module, "_STEERING_KEPT_BYTES", 0)
    refitted_model = _committee(X, y, np.arange(40), np.arange(40, 45))
    refitted = steering.decide_on_arrival(sent, refitted_model, X, settings, 3, range(45), pending, free_slots=2)
    assert member_systems(refitted_model) is None
    np.testing.assert_array_equal(bordered.picks, refitted.picks)
    np.testing.assert_allclose(bordered.mu, refitted.mu, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(bordered.sigma, refitted.sigma, rtol=1e-7, atol=1e-12)
    assert bordered.stats.risk == pytest.approx(refitted.stats.risk, rel=1e-7, abs=1e-12)
    literal = steering.believed_committee(sent, refitted_model, X, range(45), pending)
    np.testing.assert_allclose(believed.coef_, literal.coef_, rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(believed.intercept_, literal.intercept_, rtol=1e-7, atol=1e-10)
    np.testing.assert_array_equal(believed.subsets_, literal.subsets_)


def test_an_arrival_decision_with_jobs_pending_records_the_forecaster_that_ranked_its_picks():
    """The picks of a decision with jobs pending come from the believing committee's decision: its
    record must name the forecaster that ranked them (p_window), as a batch decision's does."""
    X, y, view, settings = _view_and_settings(labelled=50)
    settings.campaign.acquisition = "p_window"
    model = _committee(X, y, np.arange(40), np.arange(40, 50))
    pending = [60, 61]
    view = cp.CampaignView(view.n_atoms, view.energy_ff, view.atoms_per_molecule, view.picks + pending, view.results)
    decision = steering.decide_on_arrival(view, model, X, settings, 7, fitted_rows=range(50), pending=pending,
                                          free_slots=2)
    assert len(decision.picks) == 2 and decision.stats.forecaster == "committee"
    stopped = steering.decide_on_arrival(view, model, X, settings, 7, fitted_rows=range(50), pending=pending,
                                         free_slots=0)
    assert len(stopped.picks) == 0 and stopped.stats.forecaster is None


def test_a_decision_given_back_the_law_it_stated_its_risk_in_states_the_same_risk_and_picks():
    """An arrival's picks are ranked in the law its check found (``decide(..., law=...)``) instead
    of a second search over the likelihood region: given the law a decision stated its risk in,
    the same committee must state the same risk and make the same picks."""
    X, y, view, settings = _view_and_settings(labelled=50)
    settings.campaign.acquisition = "p_window"
    model = _committee(X, y, np.arange(40), np.arange(40, 50))
    rng = np.random.default_rng(3)
    mu, sd = model.predict(X, return_std=True)
    # the predictions made before each pick after the first 20 was measured, with errors of a t law
    predictions = {i: (float(4 * mu[i] + 4 * sd[i] * rng.standard_t(5)), float(4 * sd[i] / model.calibration_))
                   for i in range(20, 50)}
    view = cp.CampaignView(view.n_atoms, view.energy_ff, 4, view.picks, view.results, predictions)
    searched = cp.decide(view, model, X, settings, 7)
    assert np.isfinite(searched.stats.risk) and searched.stats.error_law() is not None
    given = cp.decide(view, model, X, settings, 7, law=searched.stats.error_law())
    assert given.stats.risk == pytest.approx(searched.stats.risk, rel=1e-12)
    np.testing.assert_array_equal(given.picks, searched.picks)
    assert given.stats.error_law() == searched.stats.error_law()
