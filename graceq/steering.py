"""Asynchronous steering, with no I/O: which structures to send when slots free up.

In asynchronous mode (``[campaign] mode = "async"``, ``slots = N``) the coordinator keeps N
reference jobs in flight and decides each time a result arrives. The committee it has was fitted
some arrivals ago (a full refit, lambda and calibration included, runs through the ``fit`` queue
every ``refit_every`` arrivals). Between refits the committee is brought up to date here:

- the results that arrived since its fit join every member's training rows at their measured
  labels;
- the jobs still running join them at their predicted means (Kriging-Believer over what is
  pending: they are believed, so that the next picks do not pile up around them);

then :func:`graceq.campaign.decide` (the same stop check and the same Kriging-Believer as the
synchronous rounds) picks as many new structures as there are free slots. Same lambda, same
member subsets, same calibration as the fitted committee: only rows are added, as the
Kriging-Believer recipe of DESIGN.md section 5 does for its believed points. Every decision is a
function of the fitted committee, the stored results and the picks in flight, so a coordinator
that replays the stored arrival order makes the same decisions.
"""

from __future__ import annotations

import numpy as np
from sklearn import config_context

from graceq import campaign as cp
from graceq.model import CommitteeRidge, MemberSystems, fit_members, member_systems


def farthest_points_due(n_init: int, slots: int, n_arrived: int, n_pool: int, budget: int | None = None) -> int:
    """How many farthest-point picks asynchronous mode has made once ``n_arrived`` results are in.

    There is no committee before the first fit, and farthest point sampling is what the design
    picks with no model: the initial batch (``n_init``) is sent with, when ``slots`` is larger,
    the sampling's continuation on the free slots; each arrival before the first fit (which runs
    after ``n_init`` arrivals) sends the next farthest point. So no slot waits for a model, and
    the count is a function of the arrival count only (a restarted coordinator makes the same
    picks: the sampling is greedy, its first k picks do not depend on how many follow). Capped by
    the pool and the budget, never below the initial batch. With no more slots than ``n_init`` the
    initial batch alone is sent: the slots it leaves free near its end would go to farthest points
    that cost calls the model's first picks would use better (measured: benzamide, 8 slots, n_init
    20, 4 seeds: 154 calls to full recall with that top-up, 123 without, and a longer wall time).
    """
    n0 = min(int(n_init), int(n_pool))
    if int(slots) <= n0:
        return n0
    cap = min(int(n_pool), int(budget or n_pool))
    return max(n0, min(cap, int(slots) + min(int(n_arrived), n0 - 1)))


class Span:
    """The pool in exact coordinates of the span of the rows the committee's members are fitted on.

    Every ridge member's weights lie in the span of its (centred) training rows: the fit's train
    rows, and the rows a decision adds (the results since the fit, the pending jobs). With ``Q``
    (p x r) an orthonormal basis of the span of ``x_i - c`` over those rows (``c``: the pool's mean
    features), a member predicts ``x . w + b = z . (Q^T w) + (b + c . w)`` with ``z = (x - c) Q``:
    the same number, from r coordinates instead of p. Refitting a member on rows inside the span gives
    the same member in either coordinates (ridge depends on the rows' dot products only, and the
    intercept absorbs the shift ``c``). So the pool's coordinates ``Z = (F - c) Q`` (n_pool x r)
    stand in for the features in a decision: the predictions, the believed rows, the stop check and
    the picks are those of the features up to round-off, at r / p of the cost.

    The basis grows with the rows, in the order the decisions use them (block Gram-Schmidt against
    the basis, twice, then an SVD of what is left, which drops the directions below 1e-10 of the
    rows' norm): each new pick adds one column to ``Z`` (one pool x features matrix-vector
    product), not a pass of the whole committee over the features; a refit adds its test rows.
    Worth it while r is small against p: ``useful`` is False once r passes half the features (then
    the decision is made in the features).
    """

    TOLERANCE = 1e-10

    def __init__(self, features: np.ndarray):
        self.features = np.asarray(features, dtype=np.float64)
        n, p = self.features.shape
        self.shift = self.features.mean(axis=0)
        self.rows: list[int] = []              # pool rows in the span, in the order they came in
        self._Q = np.empty((p, 0))
        self._Z = np.empty((n, 0))
        self.r = 0

    @property
    def Q(self) -> np.ndarray:
        return self._Q[:, :self.r]

    @property
    def Z(self) -> np.ndarray:
        return self._Z[:, :self.r]

    @property
    def useful(self) -> bool:
        return 2 * self.r <= self.features.shape[1]

    def cover(self, rows) -> "Span":
        """Bring the pool rows ``rows`` (in their order) into the span; returns self."""
        known = set(self.rows)
        new = [int(i) for i in rows if int(i) not in known and not known.add(int(i))]
        if not new or not self.useful:  # past half the features the span is not used: keep no more
            return self
        p = self.features.shape[1]
        block = (self.features[new] - self.shift).T                 # (p, k)
        scale = max(float(np.linalg.norm(block, axis=0).max()), np.finfo(float).tiny)
        Q = self.Q
        for _ in range(2):                                          # twice is enough (Giraud et al. 2005)
            block = block - Q @ (Q.T @ block)
        U, S, _ = np.linalg.svd(block, full_matrices=False)         # rank-revealing: drops dependent rows
        keep = S > self.TOLERANCE * scale
        D = U[:, keep][:, :p - self.r]
        self.rows += new
        if D.shape[1] == 0:
            return self
        need = self.r + D.shape[1]
        if need > self._Q.shape[1]:                                 # grow the storage by a quarter
            cap = min(p, max(need + 64, self._Q.shape[1] * 5 // 4))
            self._Q = np.hstack([self._Q[:, :self.r], np.empty((p, cap - self.r))])
            self._Z = np.hstack([self._Z[:, :self.r], np.empty((len(self.features), cap - self.r))])
        self._Q[:, self.r:need] = D
        self._Z[:, self.r:need] = self.features @ D - self.shift @ D
        self.r = need
        return self

    def committee(self, model: CommitteeRidge, train_rows=None) -> CommitteeRidge:
        """The committee in the span's coordinates; its training rows must be in the span
        (``train_rows``: their pool indices, which saves projecting them)."""
        Q = self.Q
        X = self.Z[np.asarray(train_rows, dtype=int)] if train_rows is not None else (model.X_train_ - self.shift) @ Q
        back = X[:3] @ Q.T + self.shift          # a cheap look that these are the rows it was fitted on
        if not np.allclose(back, model.X_train_[:3], rtol=1e-8, atol=1e-8 * float(np.abs(back).max(initial=1.0))):
            raise ValueError("the committee's training rows are not the given pool rows, or not in the span")
        return _rebuilt(model, X, model.y_train_, model.subsets_, model.coef_ @ Q,
                        model.intercept_ + model.coef_ @ self.shift)


def _rebuilt(model: CommitteeRidge, X, y, subsets, coef, intercept) -> CommitteeRidge:
    """A committee with ``model``'s parameters, lambda and calibration, and the given rows and members."""
    params = {k: getattr(model, k) for k in ("n_members", "subsample", "alphas", "cv", "random_state")}
    rebuilt = CommitteeRidge.from_members(X, y, model.alpha_, subsets, coef, intercept,
                                          cv_rmse=model.cv_rmse_, **params)
    for attribute in ("calibration_", "calibration_alpha2_", "calibration_warning_", "test_rmse_"):
        setattr(rebuilt, attribute, getattr(model, attribute))
    return rebuilt


def with_rows(model: CommitteeRidge, X_extra: np.ndarray, y_extra: np.ndarray) -> CommitteeRidge:
    """The committee with rows added to every member's training set (same lambda, subsets, calibration).

    ``y_extra`` is in the model's target unit (delta per atom). Equal to refitting each member
    ``Ridge(lambda).fit(vstack(X_train[subset], X_extra), concat(y_train[subset], y_extra))``.
    """
    X_extra = np.asarray(X_extra, dtype=np.float64).reshape(-1, model.n_features_in_)
    y_extra = np.asarray(y_extra, dtype=np.float64).ravel()
    if len(X_extra) == 0:
        return model
    n_train = len(model.y_train_)
    X = np.vstack([model.X_train_, X_extra])
    y = np.concatenate([model.y_train_, y_extra])
    extra = np.arange(n_train, n_train + len(X_extra))
    subsets = np.hstack([model.subsets_, np.broadcast_to(extra, (len(model.subsets_), len(extra)))])
    return _rebuilt(model, X, y, subsets, *fit_members(X, y, model.alpha_, subsets))


def growing(model: CommitteeRidge, X_extra: np.ndarray, systems: MemberSystems | None = None, rows=None):
    """A function ``(y_extra, j) -> committee`` with the first j rows of ``X_extra`` added to every
    member at labels ``y_extra``: the bordered solve of ``systems`` (the fitted committee's
    :class:`graceq.model.MemberSystems`, the rows in ``model``'s coordinates) when given, else
    :func:`with_rows`. The bordering is done once for all rows; each call is then a few
    triangular solves per member. ``rows``: the pool indices of ``X_extra``'s rows (the systems
    keep their bordering columns for the next decision)."""
    X_extra = np.asarray(X_extra, dtype=np.float64).reshape(-1, model.n_features_in_)
    border = systems.border(model.X_train_, X_extra, rows) if systems is not None and len(X_extra) else None

    def grown(y_extra, j: int) -> CommitteeRidge:
        if j == 0:
            return model
        if border is None:
            return with_rows(model, X_extra[:j], y_extra)
        n_train = len(model.y_train_)
        added = np.broadcast_to(np.arange(n_train, n_train + j), (len(model.subsets_), j))
        return _rebuilt(model, np.vstack([model.X_train_, X_extra[:j]]), np.concatenate([model.y_train_, y_extra]),
                        np.hstack([model.subsets_, added]), *border.members(y_extra, j))

    return grown


def since_fit(view: cp.CampaignView, fitted_rows) -> list[int]:
    """The measured stable rows a committee was not fitted on (``fitted_rows``: its train and test
    rows), in the order they arrived."""
    seen = set(int(i) for i in fitted_rows)
    return [int(i) for i in view.stable_rows() if int(i) not in seen]


def brought_up_to_date(view: cp.CampaignView, model: CommitteeRidge, features: np.ndarray, fitted_rows, pending,
                       systems: MemberSystems | None = None):
    """``(measured, believing)``: the committee with the results since its fit added at their
    labels, and a function that returns it with the pending jobs added too, at that committee's
    predicted means (made only when asked: one bordering serves both).

    ``fitted_rows``: pool indices the committee saw when it was fitted (train and test rows);
    ``pending``: pool indices sent and without a result, in the order they were picked;
    ``systems``: as in :func:`growing`.
    """
    new = np.array(since_fit(view, fitted_rows), dtype=int)
    running = np.asarray([int(i) for i in pending if int(i) not in view.results], dtype=int)
    rows = np.concatenate([new, running])
    grown = growing(model, features[rows], systems, rows)
    y_new = view.delta_per_atom(new) if len(new) else np.empty(0)
    measured = grown(y_new, len(new))

    def believing() -> CommitteeRidge:
        if not len(running):
            return measured
        return grown(np.concatenate([y_new, measured.predict(features[running])]), len(rows))

    return measured, believing


def believed_committee(view: cp.CampaignView, model: CommitteeRidge, features: np.ndarray,
                       fitted_rows, pending, systems: MemberSystems | None = None) -> CommitteeRidge:
    """The committee brought up to date: results since its fit at their labels, then pending jobs
    believed at the predicted means of that committee."""
    return brought_up_to_date(view, model, features, fitted_rows, pending, systems)[1]()


def decide_on_arrival(view: cp.CampaignView, model: CommitteeRidge, features: np.ndarray, settings,
                      decision: int, fitted_rows, pending, free_slots: int, span: Span | None = None) -> cp.Decision:
    """The stop check and up to ``free_slots`` new picks, with the pending jobs believed.

    ``view.picks`` holds every pick so far, the pending ones included (they are never candidates
    and count towards the budget). The stop is :func:`graceq.campaign.decide`'s, as in batch mode,
    evaluated on what is measured: the pending jobs count as unmeasured, with the committee's honest
    uncertainty (believing them would claim their energies as found). The picks come from the
    committee that believes them, in the error law the check's risk was stated in. When that
    believing committee would already stop in it (the campaign converges if the running jobs come
    back as predicted), nothing new is sent until they report.

    ``span``: a :class:`Span` of ``features`` kept from one decision to the next; the decision is
    then made in its coordinates while they are fewer than half the features (the same decision,
    up to round-off, at a fraction of the cost). Not when the acquisition believes candidates
    within the batch and more than one slot is free (the believed candidates are not in the span).
    ``fitted_rows`` must start with the committee's training rows (then its test rows).

    The results since the fit and the pending jobs join the members by a bordered solve of the
    fitted committee's member systems (:func:`graceq.model.member_systems`: factorised once per
    fit, which the coordinator does in the fit's background thread), not by refitting them.
    """
    with config_context(assume_finite=True):  # the coordinator checks the pool's features once, when it loads them
        return _decided(view, model, features, settings, decision, fitted_rows, pending, free_slots, span)


def _decided(view, model, features, settings, decision, fitted_rows, pending, free_slots, span) -> cp.Decision:
    pending = [int(i) for i in pending if int(i) not in view.results]
    systems = member_systems(model)  # the fitted committee's, in any coordinates that hold its rows
    in_span = free_slots <= 1 or settings.campaign.acquisition not in cp.BELIEVES_WITHIN_BATCH
    if span is not None and in_span:
        fitted_rows = [int(i) for i in fitted_rows]
        n_train = len(model.y_train_)
        # the rows the members are fitted on here: the fit's train rows, the results since, the pending jobs
        span.cover(fitted_rows[:n_train] + since_fit(view, fitted_rows) + pending)
        if span.useful:
            model = span.committee(model, fitted_rows[:n_train])
            features = span.Z
    measured_model, believing = brought_up_to_date(view, model, features, fitted_rows, pending, systems)
    n_batch = max(int(free_slots), 1)
    # one decision per arrival: what the slots take, never a batch's trim (that is batch mode's)
    c = settings.campaign.model_copy(update={"n_batch": n_batch, "mode": "async"})
    narrowed = settings.model_copy(update={"campaign": c})
    running = set(pending)
    measured_view = cp.CampaignView(view.n_atoms, view.energy_ff, view.atoms_per_molecule,
                                    [i for i in view.picks if i not in running], view.results, view.predictions)
    # with jobs pending the picks come from the believing committee below: the check only assesses
    check = cp.decide(measured_view, measured_model, features, narrowed, decision, pick=not pending)
    n_calls = len(view.picks)
    budget = settings.campaign.budget or len(view.n_atoms)
    stop = check.stop
    if stop is None and n_calls >= budget:
        stop = "budget"
    picks, pick_ei, forecaster = check.picks[:0], check.pick_ei[:0], None
    if stop is None and free_slots > 0:
        # the believing committee ranks and pauses in the law the check found on the same errors:
        # the largest risk over the likelihood region is the check's statement, and searching it
        # again for the believing committee's predictions cost 0.3 s per arrival on a 100k pool
        chosen = (cp.decide(view, believing(), features, narrowed, decision, law=check.stats.error_law())
                  if pending else check)
        picks, pick_ei, forecaster = chosen.picks[:free_slots], chosen.pick_ei[:free_slots], chosen.stats.forecaster
    stats = _updated(check.stats, n_reference_calls=int(n_calls), n_pending=len(pending),
                     n_next=int(len(picks)), stop=stop, forecaster=forecaster)
    return cp.Decision(stats, check.mu, check.sigma, check.ei, picks, pick_ei, stop)


def _updated(stats, **changes):
    """The iteration statistics with some values changed (a dict, or a dataclass record whose
    fields are kept: a change it has no field for is left out)."""
    if isinstance(stats, dict):
        return dict(stats, **changes)
    from dataclasses import fields, replace

    known = {f.name for f in fields(stats)}
    return replace(stats, **{k: v for k, v in changes.items() if k in known})
