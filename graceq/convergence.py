"""Convergence of a campaign: how many window structures are still expected (DESIGN.md 6).

Two statements are computed after every iteration.

**p_conv (the seed's rule, ``stop_rule = "p_conv"``).** Every unlabelled pool structure gets a
normal density of its reference energy (mean ``mu``, calibrated std ``sigma``, energy per
molecule); their sum is the predicted energy density of the pool, the expected number of window
structures not yet measured is the *residual* ``sum_i Phi((T - mu_i) / sigma_i)`` and
``p_conv = N_measured / (N_measured + residual)``. It is a ratio of point estimates: it says
nothing a user can hold it to, and it accepts more missing structures the larger the window.

**The stated risk (``stop_rule = "risk"``, the default).** The campaign stops when it can say
"the expected number of window structures still unmeasured is at most R", hence, by Markov's
inequality, "P(at least one window structure is missed) <= R", with R <= ``risk`` (0.05 by
default). The argument:

1. *What is missed.* With T = E_best + window (E_best >= the true minimum, so T is at or above
   the true window's edge), the structures missed are the unmeasured i with E_i <= T, and
   ``E[N_missed] = sum_i P(E_i <= T)``. Markov: ``P(N_missed >= 1) <= E[N_missed]``.
2. *Which law of errors.* ``P(E_i <= T) = F((T - mu_i) / w_i)`` with
   ``w_i = sqrt((k s_i)^2 + noise^2)``: ``s_i`` is the committee's raw (uncalibrated) spread, F a
   t law. F, k and the noise are not assumed: they are fitted to the campaign's own *prospective*
   errors, one per measured structure, each from the prediction made *before* that structure was
   measured (the picks table keeps it). Those errors are out of sample by construction, unlike
   training or cross-validation residuals, and there are as many as there are picks, so the
   calibration does not jump with the 20 % test set of one iteration (it does: the committee's
   calibration factor varied 1x-7x between consecutive iterations on benzamide).
   *Why a noise term* (``error_law = "spread_and_noise"``, the default since 2026-12-07). A
   prediction's error has two parts: the committee's estimation error, which its spread measures
   and which shrinks as the training set grows, and the part of the delta that no ridge on these
   inputs represents (what the descriptor cannot see), which does not shrink. Standardised by the
   spread alone (``error_law = "spread"``, the rule before), the errors of late picks are larger
   than those of early ones, because their spreads have shrunk while the noise has not. One law
   fitted to all of them sees a mixture of scales. It reads that mixture as a heavy tail and
   applies the tail to every unmeasured structure. On a 3,000-structure synthetic landscape
   (``benchmarks/synthetic.py``) that statement stalled: 5 of 10 campaigns stopped only after
   2,340-2,350 calls, where the law with noise stopped after 530-980, both with every window
   structure found. The law with noise nests the old one (noise 0), so the likelihood decides how
   much noise there is. On ROY-264 (seed 0) at 200-240 calls the likelihood-ratio statistic for
   it is 19-32 (one parameter: p < 1e-4), with a normal tail and a noise of 4.7-5.9 kJ/mol per molecule,
   and the statements made in the middle of a campaign are closer to the misses then observed
   (benchmarks/README.md). The noise is profiled over a grid of noise-to-spread ratios
   (``NOISE_GRID``), and the scale factor is solved exactly for each.
   *A noise that grows with the force-field height* (``error_law = "spread_noise_height"``,
   opt-in). Strained, high-lying force-field minima may move further and less predictably when
   re-minimised, and a campaign measures the low structures first: a constant noise fitted on the
   picks then understates the errors of the high structures it leaves unmeasured. This law's
   noise is ``sqrt(noise^2 + (kappa h)^2)``, ``h`` the force-field height above the pool's minimum
   per molecule. It nests the constant noise (kappa = 0) and the likelihood decides kappa (the
   noise and kappa over a two-dimensional grid, ``HEIGHT_GRID``). But kappa, like the tail, is
   what carries the measured errors over to the unmeasured structures, and while the picks are
   all low the errors leave it poorly determined: fitted at its maximum likelihood alone, 7 of 10
   campaigns on a synthetic landscape whose noise grows with the height stopped at 835-970 calls
   stating 0.048 where the truth was 0.09-0.11 (the other 3 stopped at 2,130-2,180, honest). So
   kappa joins the confidence set as the degrees of freedom do (point 4): every (df, kappa) whose
   likelihood, the noise and scale at their best, is above the same cut, and the two edges of
   kappa's interval solved for. The cut stays chi2_1: the statement is about one number, the
   risk, and the profile likelihood of a scalar function of the law's parameters is chi2_1 by
   Wilks. Measured (2026-12-07, fifth session; benchmarks/README.md): on ROY-264 the errors do
   grow with the height (likelihood-ratio statistic 21.6 for kappa at seed 0's stop, p < 1e-5)
   and the rule stops after 259.0 calls instead of 251.6, no miss either way; on benzamide kappa
   is 0 and the stops are unchanged. On the synthetic landscape the confidence set did not mend
   the statement either (seed 1: 893 calls, 0.048 stated, 0.107 true), so the law stays opt-in.
   There the law's kappa and noise were right (widths 0.93-1.03 of the true ones): the gap is a
   7 % narrower scale and 4.3 df instead of 4, both plausible on 870 errors, which the set along
   df (the scale at its best) does not hold. Point 4's region is what mends it: with the largest
   risk over the whole likelihood region, 8 of 10 runs on that landscape stop after 2,164-2,270
   calls, honest, and the stated risks of the 10 sum to 0.49 where the truth is 0.33; 2 still stop
   early against the truth (0.049 stated, 0.070 and 0.086 true). It stays opt-in: a fit costs about
   1.5 s on 1,000 errors (the whole grid), and on ROY-264 it stops later (benchmarks/README.md).
3. *Tails.* A missed window structure is, by definition, a large negative error: the rule lives
   in F's lower tail, where a normal law is a guess. F is a Student t (location 0), which
   contains the normal law (large nu) and lets heavy tails show when the errors have them. On
   benzamide the fitted nu is about 4, and a normal law stated a risk of 0.008 at a moment when a
   window structure was still missing (error -26 kJ/mol at a predicted spread of 7 kJ/mol).
   The location is kept at 0 rather than fitted: picks are chosen because they are predicted
   low, so their errors lean positive (the winner's curse) while the structures left unmeasured
   lean negative; a fitted location would carry the picks' bias into the unmeasured ones.
   Both halves of the errors inform the tail shape. Fitting the lower half alone (errors below
   prediction, mirrored) was measured: it stops far sooner on benzamide, whose upper tail is
   the heavier one (structures the reference level destabilises), but on the synthetic
   heavy-tailed landscape of the tests it stopped with window structures missing in 3 of 6
   seeds, where the law of both halves missed none in 10: half the data is too little for a tail.
4. *Confidence in F.* A tail shape fitted on a few dozen errors is itself uncertain, and the
   heavy shapes are the ones that matter. The stated risk is the largest sum over every t law
   that the prospective errors leave plausible: a profile likelihood over the degrees of freedom
   (each with its maximum-likelihood scale), keeping the laws within ``chi2_1(c) / 2`` of the best
   log-likelihood (Wilks), c = ``risk_confidence`` (0.95 by default). The statement then reads:
   "with confidence c in the law of the model's errors, P(a window structure is missed) <= R".
   On a synthetic landscape whose errors are t-distributed (2.5 degrees of freedom) the
   maximum-likelihood law alone, fitted on 24 errors, stated 0.007 with a window structure
   missing; the confidence set kept measuring until it was found (tests/test_stop_rule.py).
   The set is an interval of degrees of freedom, and its heavy edge is where the risk of a large
   pool is stated: there, far above the threshold, the sum is a sum of far-tail probabilities,
   which change several-fold between neighbouring tail shapes. So the edges are solved for
   (Brent's method between the points of ``DF_GRID``), not read off the grid, which steps by 35 %
   in df and would round the heavy edge inward to a lighter law. Measured (2026-12-07, fourth
   session) on the 3,000-structure landscapes of ``benchmarks/synthetic.py``, whose noise is a t
   law of 4 df and which are drawn to the model's own assumptions: with the grid's points alone
   the rule stopped after 540-1,280 calls stating 0.027-0.05, where the landscape's own law gives
   0.054-0.25 expected misses, and below the 1,314-1,382 calls after which even a rule that knew
   the delta and the noise law exactly could state 0.05. With the edges solved for, 30 stops
   (3 landscapes, 10 seeds) state 1.47 expected misses in all where the truth is 0.87; 3 of them,
   on one landscape, still come before that floor (the confidence in the law is 95 %, not 1).
   *The whole region, not the df path* (2026-12-07, sixth session). The risk is one scalar
   function R(theta) of all the law's parameters theta = (df, scale, noise[, kappa]), so its upper
   confidence bound is ``max R(theta)`` over every theta whose log-likelihood is within
   ``chi2_1(c) / 2`` of the maximum (the same Wilks argument, applied to R itself). The set above
   holds only the path along df, every other parameter at its best for each df; R is largest on
   that path only when the tail alone moves it. It is not when a second parameter also carries
   the errors over to the unmeasured structures: under the height law, a heavier height term with
   a lighter tail and a wider scale is as plausible as the path's laws and states twice their risk.
   So the statement is the maximum over the region itself (:func:`region_expected_missed`:
   SLSQP from the path's largest law, under the cut below the continuous maximum likelihood, the
   path's own maximum kept as a floor). Measured at the height law's early stops on the synthetic
   landscape whose noise grows with the height (seeds 1 and 3: 893 and 838 calls): the path stated
   0.048 and 0.043, the region states 0.10 and 0.09, where the truth is 0.107 and 0.112. Under the
   default law the path's heavy edge is already the region's maximum to within 0.003 at every stop
   rebuilt (synthetic linear and height_noise, 8 stops), as it must be when the tail is the only
   parameter that reaches the far tail.
5. *Looking after every batch, and what the confidence holds.* Given F the statement is an
   expectation, and checking it after each batch needs no correction. But F is a confidence
   statement, and the campaign stops at the first look whose bound falls below the target, so the
   looks that stop it are those whose region happened to be optimistic (optional stopping), and
   Wilks' chi2_1 is a large-sample law, here applied to a tail parameter. Both were measured where
   the truth is known (``benchmarks/coverage.py``: prospective errors drawn from the law the rule
   fits, t of 4 df, a campaign that measures in the true order; 2026-12-07). With about 2,000
   errors at the stop (3,000-structure pool, 80 replicates) the bound held at 319 of 320 fixed
   looks and at 79 of 80 stops, stating 3.86 expected misses in all where the truth was 1.64:
   neither effect shows. With 120-330 errors (400 structures, the size of the bundled pools; 800
   replicates, 2026-12-08) it held at 95.1-95.5 % of fixed looks (each share's 95 % interval
   holds 95 %) and at 94.1 % of stops (92.3-95.6 %); 4.4 % of the stops left a true risk above
   the target, and the true expected misses at a stop averaged 0.013. The cut is one-sided here
   (only the upper end of the risk's interval is stated), where Wilks' chi2_1(c) would hold
   (1 + c) / 2 = 97.5 % in the limit; at a few hundred errors the truth's profile likelihood ratio
   passed it in 3.5 % of 1,500 draws: the finite sample spends most of that margin, and the stops,
   chosen at the first optimistic look, about one point more. (A run of 200 replicates had read
   94 % and 93 % and blamed Wilks' approximation; 800 do not bear that out.) A parametric
   bootstrap of the cut (Beran's prepivoting, the ratio's 95 % quantile with errors drawn from the
   fitted law or from the region's edge law) was tried and put the quantile at 0.6-3.5, below
   Wilks' 3.84, in every draw tried, the short ones included: where the bound falls short, the
   fitted tail is lighter than the truth, and a bootstrap from it cannot know. ``risk_confidence =
   0.99`` held at 98.75-99 % of fixed looks and 98.6 % of stops there, at 22 more calls in that
   simulation and 1.6 (ROY-264) and 1-10 (benzamide) more on the bundled pools: the setting for a
   campaign that must hold 95 % at its stop on a small pool. F is
   refitted on all prospective errors at every iteration, and at least ``MIN_PROSPECTIVE`` of them
   are required before any risk is stated (below that, the risk is infinite and the campaign goes on).

**Which forecaster ranks the batch (``acquisition = "p_window"``).** The batch that finds the
most window structures in expectation is the one with the largest probabilities
``P(E_i <= T)``; which structures those are depends on the forecaster of ``E_i``. Three are
compared: the committee (mean ``mu``, spread ``s``: ``E ~ mu + s t``), its mean with one scale
for all (``E ~ mu + c t``: rank by ``mu``, greedy), and the force field shifted by the median
measured delta (``E ~ E_ff + d + c t``: the cheap level's own ranking). Each is judged by the
log-likelihood of the reference energies the campaign measured, each forecast made before its
measurement (Dawid's prequential principle), with its t law's tail and scale fitted by maximum
likelihood: two fitted parameters each, so the comparison is Akaike's. The committee is the
default: another forecaster ranks only when Vuong's test for non-nested models says, at 95 %
(``SWITCH_CONFIDENCE``), that it forecasts better; a campaign does not change its ranking on the
noise of a few dozen forecasts (on ROY, whose force field ranks badly, the force field's
forecasts beat the committee's of the first 30 calls, made by a model fitted on 20 structures,
without significance). Only the most recent half
of the forecasts is scored (all of them while fewer than ``2 MIN_PROSPECTIVE``): the committee
learns, and its forecasts of forty calls ago are those of a different, worse forecaster. When the
committee's spread says nothing about its errors, the mean wins and the campaign ranks by it;
when the model has not yet learned more than the cheap level knows, the force field wins. The
choice moves only the order of the picks: the stop rule above keeps the committee's law.

**Why the statement is not an audit sample's.** Total-recall screening (Callaghan and
Mueller-Hansen, Systematic Reviews 9:273, 2020) stops by rejecting "recall < target" with a
hypergeometric test on a uniform sample of the unscreened rest: no model is needed. But the target
there is a recall below one. A window holds a few dozen structures (4-46 on the bundled pools),
where a 95 % recall target tolerates no miss at all, so the test must reject "at least one window
structure is unmeasured". A uniform sample of n of the N unmeasured structures misses one given
window structure with probability 1 - n / N, so rejecting at level R needs n >= (1 - R) N: the audit
measures 95 % of what is left. Weighting the draws by the model's P(window) (an importance-weighted
audit) does not help: under that hypothesis the window structure may be the one the weights draw
least, with probability pi_min <= 1 / N per draw, and n >= ln(1/R) / pi_min >= 3 N draws. A sample
certifies only what it measures; a statement about the unmeasured needs a law of the errors, and
the prospective errors are the out-of-sample evidence for one. Even started at the very call of
full recall (which no campaign knows), the audit would stop after 261 calls on ROY-264 (the rule:
257) and 654-663 on benzamide (the rule: 618-632), from retro.py's per-seed calls to full recall.

What it cannot see: an error law that changes between the measured and the unmeasured part of
the pool beyond what the committee's spread already expresses (the spread grows away from the
training data, which is the point of standardising by it). Measured on landscapes that break
this on purpose (``benchmarks/synthetic.py --families``, 30 campaigns each, 3,000 structures):
a noise that grows with the force-field height, so that the unmeasured high structures are
noisier than the picks, makes the statement about half the truth (0.05 stated, 0.06-0.09 true)
and the rule stops before an oracle could in 17 of 30 runs (the height law above, with the
region of point 4, mends it in 8 of 10 runs of one landscape); a delta part the ridge cannot
represent (quadratic in the descriptor, left-skewed errors) gave 1 early stop in 30; a step in
the delta on a family of 2.5 % of the pool gave none. The first of these the campaign can test on
its own errors: :func:`height_growth`, the likelihood-ratio test of a noise that grows with the
force-field height against the constant one, which `graceq status` reports, naming the law that
lets the noise grow when the test says so at 1 %. Nor can it see errors whose *mean* changes with
the height: every law here has mean 0. On ROY-264 the prospective errors fall with the height
(Spearman's rho -0.69 over the README demo's 232 errors: the descriptor cannot express the
deltas' trend with E_ff), and at the demo's stop the 12 structures left, predicted 15-25 kJ/mol
per molecule above the window's edge, lie 1.1-11.1 above it: none in the window, but closer than
the stated 0.045 expected misses suggests. `graceq status` and the report give that correlation
and name ``force_field_feature``, with which the model learns the trend (the same demo: rho -0.22,
the law's noise 2.2 instead of 6.6 kJ/mol). The retrospective benchmark checks the
stated risk against the misses actually observed (benchmarks/README.md).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from scipy import optimize, special, stats
from scipy.special import ndtr

_INV_SQRT_2PI = 1.0 / np.sqrt(2.0 * np.pi)


def _check(mu, sigma):
    mu = np.asarray(mu, dtype=np.float64).ravel()
    sigma = np.asarray(sigma, dtype=np.float64).ravel()
    if mu.shape != sigma.shape:
        raise ValueError(f"mu and sigma differ in length: {mu.shape} vs {sigma.shape}")
    if np.any(sigma < 0) or not np.all(np.isfinite(mu)) or not np.all(np.isfinite(sigma)):
        raise ValueError("predicted energies must be finite and their std >= 0")
    return mu, sigma


def _normal_cdf(x, mu, sigma):
    """P(E <= x) for E ~ N(mu, sigma^2); a step function (E <= x) where sigma == 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        cdf = ndtr((x - mu) / sigma)
    return np.where(sigma > 0, cdf, (mu <= x).astype(np.float64))


def convergence_state(mu, sigma, measured, best: float, window: float) -> dict:
    """Return the convergence estimate with T = best + window (energies per molecule):

    - ``n_measured``: labelled stable structures with reference energy <= T (``measured``);
    - ``residual``: sum over unlabelled structures of Phi((T - mu_i) / sigma_i), the expected
      number of window structures not found yet (a step function where sigma_i == 0);
    - ``n_expected`` = n_measured + residual;  ``p_conv`` = n_measured / n_expected
      (1.0 when nothing is expected at all);  ``threshold`` = T.
    """
    mu, sigma = _check(mu, sigma)
    measured = np.asarray(measured, dtype=np.float64).ravel()
    if window <= 0:
        raise ValueError(f"the energy window must be > 0, got {window}")
    threshold = float(best) + float(window)
    n_measured = int(np.sum(measured <= threshold))
    residual = float(np.sum(_normal_cdf(threshold, mu, sigma)))
    n_expected = n_measured + residual
    p_conv = 1.0 if n_expected == 0 else n_measured / n_expected
    return {"threshold": threshold, "n_measured": n_measured, "residual": residual,
            "n_expected": float(n_expected), "p_conv": float(p_conv)}


#: fewest prospective errors on which the error law is fitted (two parameters, one of them a tail
#: shape); with fewer, no risk is stated and the campaign goes on
MIN_PROSPECTIVE = 20
#: the degrees of freedom profiled (log-spaced; at 1000 the t law is the normal law to 1e-3)
DF_GRID = tuple(float(v) for v in np.exp(np.linspace(np.log(1.0), np.log(1000.0), 24)))


@dataclass(frozen=True)
class ErrorLaw:
    """Student-t law (location 0) of a prospective error ``E_ref - mu`` whose scale is
    ``sqrt((scale s)^2 + noise^2 + (kappa h)^2)``: ``s`` the committee's raw spread, ``scale`` the
    factor by which it must grow to match the errors, ``noise`` the error no member can learn (same
    energy unit as ``mu``, per molecule; 0 under ``error_law = "spread"``), ``kappa`` how that error
    grows with the structure's force-field height ``h`` above the pool's force-field minimum (per
    molecule; a ratio of energies, 0 unless ``error_law = "spread_noise_height"``)."""

    df: float       # degrees of freedom: heavy tails when small, the normal law as df -> inf
    scale: float    # the factor by which the raw spread must grow to match the errors
    n: int          # prospective errors it was fitted on
    noise: float = 0.0
    kappa: float = 0.0  # unlearnable error per unit of force-field height (energy / energy)

    def scales(self, spread, height=None) -> np.ndarray:
        """The t law's scale for each raw spread ``s`` and force-field height ``h`` (per molecule):
        ``sqrt((scale s)^2 + noise^2 + (kappa h)^2)``; ``height`` may be left out when kappa is 0."""
        out = np.hypot(self.scale * np.asarray(spread, dtype=np.float64), self.noise)
        if self.kappa > 0:
            if height is None:
                raise ValueError("this error law grows with the force-field height: give each structure's height")
            out = np.hypot(out, self.kappa * np.asarray(height, dtype=np.float64))
        return out

    def p_below(self, threshold: float, mu, spread, height=None) -> np.ndarray:
        """P(E <= threshold) for each structure of predicted mean ``mu``, raw spread ``spread`` and
        force-field height ``height`` (spread 0 and no noise: 1 at or below the threshold, else 0)."""
        return special.stdtr(self.df, self.gaps(threshold, mu, spread, height)[0])

    def gaps(self, threshold: float, mu, spread, height=None) -> tuple[np.ndarray, np.ndarray]:
        """Each structure's gap to the threshold in units of its scale, ``z = (threshold - mu) / w``
        (+-inf where ``w`` is 0), and the scales ``w`` (:meth:`scales`): ``p_below`` is ``F(z)``."""
        mu = np.asarray(mu, dtype=np.float64)
        scale = self.scales(spread, height)
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.where(scale > 0, (threshold - mu) / scale, np.where(mu <= threshold, np.inf, -np.inf))
        return z, scale

    def loglik(self, z) -> float:
        """Log-likelihood of the spread-standardised errors ``z`` under the law without noise."""
        return _t_loglik(np.asarray(z, dtype=np.float64), self.df, np.log(self.scale))


def _t_logpdf(z: np.ndarray, df: float, log_scale: float) -> np.ndarray:
    """Log density of each ``z`` under a t law (location 0, scale exp(log_scale), ``df`` degrees of
    freedom): the density written out with scipy.special (scipy.stats.t.logpdf is the reference
    in the tests; this form is ~50x faster on the few hundred errors profiled per iteration)."""
    x = z * np.exp(-log_scale)
    const = special.gammaln((df + 1.0) / 2.0) - special.gammaln(df / 2.0) - 0.5 * np.log(df * np.pi)
    return const - log_scale - (df + 1.0) / 2.0 * np.log1p(x * x / df)


def _t_loglik(z: np.ndarray, df: float, log_scale: float) -> float:
    """Log-likelihood of ``z`` under that t law (the sum of :func:`_t_logpdf`)."""
    return float(np.sum(_t_logpdf(z, df, log_scale)))


def prospective_errors(energy_ref, mu, spread, height=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Errors ``E_ref - mu`` of measured structures, from the predictions made before each was
    measured, the raw spreads of those predictions and the structures' force-field heights (0
    where ``height`` is not given): arrays of equal length, structures without a finite
    prediction, energy or positive spread left out."""
    e = np.asarray(energy_ref, dtype=np.float64)
    mu = np.asarray(mu, dtype=np.float64)
    spread = np.asarray(spread, dtype=np.float64)
    height = np.zeros(e.shape) if height is None else np.asarray(height, dtype=np.float64)
    keep = np.isfinite(e) & np.isfinite(mu) & np.isfinite(spread) & (spread > 0) & np.isfinite(height)
    return e[keep] - mu[keep], spread[keep], height[keep]


def _profile(z: np.ndarray, dfs=DF_GRID) -> list[ErrorLaw]:
    """The maximum-likelihood scale of a t law (location 0) for each of ``dfs``.

    In ``s = log(scale)`` the log-likelihood ``sum_i [-s - (df+1)/2 log(1 + u_i/df)]``,
    ``u_i = z_i^2 exp(-2 s)``, is strictly concave: its derivative, the score
    ``sum_i (df+1) u_i / (df+u_i) - n``, falls as s grows (slope
    ``-2 sum_i (df+1) df u_i / (df+u_i)^2 < 0``) to ``-n``. So the score has at most one root, the
    maximum. It lies below ``s0 + 0.35``, ``s0`` the log of the errors' RMS (at the root
    ``n <= (df+1)/df sum_i u_i``), and is sought above ``s0 - 50``: lower, only errors that are
    exactly 0 can hold it (they make the likelihood grow without bound as the scale shrinks), and
    the search stops at that bound. Newton's method for every df at once, kept inside the
    bracket where the score changes sign (bisection when a step would leave it), to 1e-12 in s.
    A one-dimensional search per df (scipy.optimize.minimize_scalar, the reference in the tests)
    gives the same scales and took most of an arrival's decision on a small pool.
    """
    z = np.asarray(z, dtype=np.float64)
    n = len(z)
    s = _log_scales(z[None, :] ** 2, np.asarray(dfs, dtype=np.float64))[0]
    return [ErrorLaw(df=float(df), scale=float(np.exp(v)), n=n) for df, v in zip(dfs, s)]


def _log_scales(z2: np.ndarray, dfs: np.ndarray) -> np.ndarray:
    """:func:`_profile`'s solve for several error sets at once: ``z2`` (rows, n) squared errors,
    ``dfs`` (d,); the maximum-likelihood log scale of each row under each df, shape (rows, d)."""
    rows, n = z2.shape
    nu = np.tile(dfs, rows)[:, None]
    z2 = np.repeat(z2, len(dfs), axis=0)

    def score_and_slope(s):
        u = z2 * np.exp(-2.0 * s)[:, None]
        w = (nu + 1.0) / (nu + u)
        return np.sum(w * u, axis=1) - n, -2.0 * np.sum(w * u * nu / (nu + u), axis=1)

    s0 = 0.5 * np.log(np.mean(z2, axis=1))
    lo, hi = s0 - 50.0, s0 + 1.0
    s = s0.copy()
    for _ in range(300):
        f, slope = score_and_slope(s)
        lo, hi = np.where(f > 0, s, lo), np.where(f > 0, hi, s)
        with np.errstate(divide="ignore", invalid="ignore"):
            newton = s - f / slope
        inside = np.isfinite(newton) & (newton >= lo) & (newton <= hi)
        s_next = np.where(inside, newton, 0.5 * (lo + hi))
        done = np.abs(s_next - s) < 1e-12
        s = s_next
        if np.all(done):
            break
    return s.reshape(rows, len(dfs))


#: the noise-to-spread ratios profiled by ``error_laws`` with noise, in units of the median raw
#: spread of the prospective errors (0, then log-spaced from 1/100 to 100 of it)
NOISE_GRID = (0.0, *(float(v) for v in np.exp(np.linspace(np.log(1e-2), np.log(1e2), 25))))


#: the height-noise-to-spread ratios profiled by ``error_laws`` with heights: the noise at the
#: median height of the prospective errors, in units of their median raw spread (0, then
#: log-spaced from 1/100 to 100 of it)
HEIGHT_GRID = (0.0, *(float(v) for v in np.exp(np.linspace(np.log(1e-2), np.log(1e2), 11))))


def error_laws(residual, spread, confidence: float = 0.95, noise: bool = True, height=None) -> list[ErrorLaw]:
    """The t laws (location 0) compatible with the prospective errors at ``confidence``, heaviest
    tail first; empty when there are fewer than ``MIN_PROSPECTIVE`` errors.

    ``residual``: the errors ``E_ref - mu``; ``spread``: the raw spread of each prediction. Profile
    likelihood over the degrees of freedom (``DF_GRID``): for each, the scale factor and (``noise``
    True) the noise that maximise the likelihood of ``residual / sqrt((scale s)^2 + noise^2)``
    (the noise over ``NOISE_GRID``, the scale solved exactly for each); a law is kept when its
    log-likelihood is within ``chi2_1(confidence) / 2`` of the best one (Wilks), and the laws at
    the edges of that interval of degrees of freedom, solved for between the grid's points, are
    added (confidence > 0). With few errors
    many tail shapes are compatible and the heavy ones make the stated risk large; every new
    prospective error narrows the set. ``noise`` False: the laws of ``residual / (scale s)``.
    ``height`` (each error's force-field height above the pool's minimum, per molecule; with
    ``noise``): the noise also grows with it, ``sqrt(noise^2 + (kappa h)^2)``, kappa profiled with
    the noise over ``HEIGHT_GRID`` (which holds 0: the law without it is one of those profiled).
    """
    r = np.asarray(residual, dtype=np.float64).ravel()
    s = np.asarray(spread, dtype=np.float64).ravel()
    if r.shape != s.shape:
        raise ValueError(f"{len(r)} prospective errors but {len(s)} spreads")
    h = np.zeros(r.shape) if height is None else np.asarray(height, dtype=np.float64).ravel()
    if h.shape != r.shape:
        raise ValueError(f"{len(r)} prospective errors but {len(h)} force-field heights")
    keep = np.isfinite(r) & np.isfinite(s) & (s > 0) & np.isfinite(h)
    r, s, h = r[keep], s[keep], h[keep]
    if np.any(h < 0):
        raise ValueError("force-field heights are above the pool's minimum: every one must be >= 0")
    if len(r) < MIN_PROSPECTIVE:
        return []
    if not np.any(r != 0):
        raise ValueError("every prospective error is exactly 0: the predictions were the answers")
    if not 0.0 <= confidence < 1.0:
        raise ValueError(f"the confidence of the error law must be in [0, 1), got {confidence}")
    heights = h.tobytes() if height is not None and noise and np.any(h > 0) else None
    return list(_fitted_laws(r.tobytes(), s.tobytes(), float(confidence), bool(noise), heights))


@functools.lru_cache(maxsize=4)
def _fitted_laws(residual: bytes, spread: bytes, confidence: float, noise: bool,
                 height: bytes | None = None) -> tuple[ErrorLaw, ...]:
    """:func:`error_laws` on checked float64 arrays (as bytes). Kept for the next call on the same
    errors (a decision made again on the same record fits them once): with the noise profiled a fit
    costs tens of ms on 1,000 errors, with heights about 1.5 s. (An asynchronous decision fitted
    them twice until 2026-12-07; its picks now reuse the law its check found.)

    With heights the grid of nuisance rows is two-dimensional (noise x height term, 26 x 12), and
    the confidence set holds, besides the maximum-likelihood path over df and its edges, every
    (df, height term) of the grid whose log-likelihood, the noise profiled, is above the cut: the
    height term governs the errors of the structures a campaign has not measured (the high ones)
    as the tail does, so its plausible values join the set as the tail's do. The statement is about
    one number, the risk, so the cut stays chi2_1 (the profile likelihood of a scalar function of
    the law's parameters). The whole grid is evaluated: about 1.5 s on 1,000 errors."""
    r, s = np.frombuffer(residual), np.frombuffer(spread)
    ratios = np.asarray(NOISE_GRID if noise else (0.0,)) * float(np.median(s))
    if height is None:
        taus = np.zeros(len(ratios))
        widths = np.hypot(s[None, :], ratios[:, None])            # (ratio, n): sqrt(s^2 + rho^2)
    else:
        h = np.frombuffer(height)
        h_ref = float(np.median(h)) or float(np.max(h))
        n_tau = len(HEIGHT_GRID)
        taus = np.asarray(HEIGHT_GRID) * float(np.median(s)) / h_ref
        ratios, taus = np.repeat(ratios, n_tau), np.tile(taus, len(ratios))   # row = ratio * n_tau + tau
        # (ratio x tau, n): sqrt(s^2 + rho^2 + (tau h)^2)
        widths = np.sqrt(s[None, :] ** 2 + ratios[:, None] ** 2 + (taus[:, None] * h[None, :]) ** 2)
    every_row = np.arange(len(ratios))

    def profiled(dfs, rows=every_row):
        """For each df: the log-likelihood at the best of the grid's ``rows`` (noise, height
        term), that row, and its scale's log."""
        return _best_rows(*_widths_loglik(r, widths[rows], dfs), rows)

    def law(df, i, log_a):
        a = float(np.exp(log_a))
        return ErrorLaw(df=float(df), scale=a, n=len(r), noise=a * float(ratios[i]), kappa=a * float(taus[i]))

    dfs = np.asarray(DF_GRID)
    loglik, log_a = _widths_loglik(r, widths, dfs)
    profile, best, best_log_a = _best_rows(loglik, log_a, every_row)
    cut = profile.max() - stats.chi2.ppf(confidence, 1) / 2.0
    kept = profile >= cut
    laws = [law(df, i, a) for df, i, a, k in zip(dfs, best, best_log_a, kept) if k]
    if confidence > 0:
        # the confidence set's edges, solved for between the grid's degrees of freedom: read off the
        # grid, the heaviest plausible tail would be rounded inward to the next grid point (the
        # grid steps by 35 % in df), and the risk stated in the far tail with it
        if height is None:
            def near(rows):
                return every_row
        else:
            def near(rows):
                """The grid rows next to (and at) each of ``rows``, in both axes."""
                i, j = np.divmod(np.asarray(rows), n_tau)
                di, dj = np.meshgrid([-1, 0, 1], [-1, 0, 1])
                i = np.clip(i[:, None] + di.ravel(), 0, len(NOISE_GRID) - 1)
                j = np.clip(j[:, None] + dj.ravel(), 0, n_tau - 1)
                return np.unique(i * n_tau + j)

            # every (df, height term) of the grid above the cut, each with its best noise
            by_tau = loglik.reshape(len(NOISE_GRID), n_tau, len(dfs))
            noise_best = np.argmax(by_tau, axis=0)                 # (tau, df)
            for j, d in zip(*np.nonzero(np.max(by_tau, axis=0) >= cut)):
                row = noise_best[j, d] * n_tau + j
                if row != best[d]:
                    laws.append(law(dfs[d], row, log_a[row, d]))
            laws += _height_edges(r, s, h, ratios[::n_tau], taus[:n_tau], by_tau, cut, dfs)
        for j in np.flatnonzero(kept[:-1] != kept[1:]):
            rows = near(best[j:j + 2])

            def above_cut(log_df):
                return float(profiled([np.exp(log_df)], rows)[0][0] - cut)

            try:
                edge = float(np.exp(optimize.brentq(above_cut, np.log(dfs[j]), np.log(dfs[j + 1]), xtol=1e-6)))
            except ValueError:  # no sign change: a grid point on the cut to round-off, and it is the edge
                continue
            _, i, a = profiled([edge], rows)
            laws.append(law(edge, i[0], a[0]))
    return tuple(sorted(laws, key=lambda lw: lw.df))


def _widths_loglik(r: np.ndarray, widths: np.ndarray, dfs) -> tuple[np.ndarray, np.ndarray]:
    """Log-likelihood of the residuals ``r`` (n,) under a t law of each df whose scale is
    ``a * widths[row]`` (widths (rows, n)), with ``a`` at its maximum likelihood (solved exactly):
    the log-likelihoods and the logs of ``a``, two (row, df) arrays."""
    dfs = np.asarray(dfs, dtype=np.float64)
    z = r[None, :] / widths
    log_a = _log_scales(z ** 2, dfs)
    loglik = (np.sum(_t_logpdf(z[:, None, :], dfs[None, :, None], log_a[:, :, None]), axis=2)
              - np.sum(np.log(widths), axis=1)[:, None])         # density of the residuals
    return loglik, log_a


def _best_rows(loglik: np.ndarray, log_a: np.ndarray, rows: np.ndarray):
    """For each df (column of :func:`_widths_loglik`'s arrays over ``rows``): the largest
    log-likelihood, its row of the grid, and that row's scale log."""
    best = np.argmax(loglik, axis=0)
    cols = np.arange(loglik.shape[1])
    return loglik[best, cols], rows[best], log_a[best, cols]


def _height_edges(r, s, h, noises, taus, by_tau, cut, dfs) -> list[ErrorLaw]:
    """The laws at the edges of the height term's confidence interval, solved for between the
    grid's height terms (Brent's method in log tau): the profile over the height term, every other
    parameter at its best, crosses the cut there. The grid steps by 2.5x in the height term, so
    read off it the plausible height terms would be one or two points. ``noises``, ``taus``: the
    grid's axes (the noise and the height term, before the scale factor); ``by_tau``: the grid's
    log-likelihoods (noise, tau, df). At an edge the noise and df are searched next to the best of
    the two grid points around it (two rows and two dfs either side)."""
    profile = np.max(by_tau, axis=(0, 2))                          # over noise and df, per tau
    inside = profile >= cut
    out = []
    for j in np.flatnonzero(inside[:-1] != inside[1:]):
        if j == 0:              # between no height term and the grid's smallest: a negligible term
            continue
        rows, cols = set(), set()
        for k in (j, j + 1):
            i, d = np.unravel_index(np.argmax(by_tau[:, k, :]), (len(noises), len(dfs)))
            rows.update(range(max(i - 2, 0), min(i + 3, len(noises))))
            cols.update(range(max(d - 2, 0), min(d + 3, len(dfs))))
        rows, near_dfs = np.array(sorted(rows)), dfs[sorted(cols)]

        def at(log_tau):
            widths = np.sqrt(s[None, :] ** 2 + noises[rows, None] ** 2 + (np.exp(log_tau) * h[None, :]) ** 2)
            return _widths_loglik(r, widths, near_dfs)

        try:
            edge = optimize.brentq(lambda x: float(at(x)[0].max() - cut), np.log(taus[j]), np.log(taus[j + 1]),
                                   xtol=1e-6)
        except ValueError:  # a grid point on the cut to round-off: it is the edge
            continue
        loglik, log_a = at(edge)
        i, d = np.unravel_index(np.argmax(loglik), loglik.shape)
        a = float(np.exp(log_a[i, d]))
        out.append(ErrorLaw(df=float(near_dfs[d]), scale=a, n=len(r), noise=a * float(noises[rows[i]]),
                            kappa=a * float(np.exp(edge))))
    return out


def expected_missed(mu, spread, threshold: float, laws, height=None) -> tuple[float, ErrorLaw | None]:
    """The largest, over the compatible error ``laws``, expected number of unmeasured structures
    with reference energy <= ``threshold``, ``sum_i F((threshold - mu_i) / w_i)``,
    ``w_i = sqrt((k s_i)^2 + noise^2 + (kappa h_i)^2)`` (F, k, noise, kappa: the law's), and the
    law that gives it; (inf, None) without any law.

    ``mu``, ``spread`` and ``height`` are the committee's mean and raw spread of the unmeasured
    structures and their force-field heights above the pool's minimum (needed only by laws with
    kappa > 0), per molecule. By Markov's inequality the value also bounds P(at least one is missed).
    """
    mu, spread = _check(mu, spread)
    if not laws:
        return float("inf"), None
    if len(mu) == 0:
        return 0.0, laws[0]
    sums = [float(np.sum(law.p_below(threshold, mu, spread, height))) for law in laws]
    k = int(np.argmax(sums))
    return sums[k], laws[k]


class _LawSpace:
    """The error laws as points of a search: ``x = (log df, log scale[, noise / u[, kappa h_u / u]])``,
    u the prospective errors' median raw spread and h_u their median force-field height (the noise
    and kappa in units that keep the search's steps comparable), and the log-likelihood of the
    errors at each point. ``errors``: ``(residual, spread, height or None)``; kappa is a coordinate
    when the heights are given, the noise when ``noise`` is True (else both stay 0)."""

    def __init__(self, residual, spread, height=None, noise: bool = True):
        r, s, h = (np.asarray(v, dtype=np.float64) for v in (residual, spread,
                                                             np.zeros(len(residual)) if height is None else height))
        keep = np.isfinite(r) & np.isfinite(s) & (s > 0) & np.isfinite(h)
        self.r, self.s, self.h = r[keep], s[keep], h[keep]
        self.with_noise, self.with_kappa = bool(noise), height is not None
        self.unit = float(np.median(self.s))              # the noise's unit: the errors' median spread
        self.h_unit = float(np.median(self.h)) or float(np.max(self.h)) or 1.0

    def law(self, x) -> ErrorLaw:
        """The law at a point."""
        df, a = float(np.exp(x[0])), float(np.exp(x[1]))
        eps = float(x[2]) * self.unit if self.with_noise else 0.0
        kappa = float(x[3]) * self.unit / self.h_unit if self.with_kappa else 0.0
        return ErrorLaw(df=df, scale=a, n=len(self.r), noise=eps, kappa=kappa)

    def loglik(self, x) -> float:
        """Log-likelihood of the errors under the law at ``x``."""
        law = self.law(x)
        w = law.scales(self.s, self.h)
        return float(np.sum(_t_logpdf(self.r / w, law.df, 0.0) - np.log(w)))

    def point(self, law: ErrorLaw) -> np.ndarray:
        """The point of a law."""
        x = [np.log(law.df), np.log(law.scale)]
        if self.with_noise:
            x.append(law.noise / self.unit)
        if self.with_kappa:
            x.append(law.kappa * self.h_unit / self.unit)
        return np.array(x)

    def bounds(self, start) -> list:
        """The search's box around ``start``: df in [1, the grid's largest], the scale within e^10 of
        the start's, the noise and kappa in [0, 1000] units."""
        return [(0.0, np.log(DF_GRID[-1])), (start[1] - 10.0, start[1] + 10.0)] + [(0.0, 1e3)] * (len(start) - 2)

    def maximum(self, laws, bounds, starts=()) -> np.ndarray:
        """The point of largest likelihood: L-BFGS-B from the most likely of ``laws`` (a grid's best;
        the grid steps by 1.5x in the noise and 2.5x in the height term, and its best can lie whole
        log-likelihood units below the maximum) and from any further ``starts``, kept only where it
        improves on where it began."""
        best = None
        for x0 in [max((self.point(law) for law in laws), key=self.loglik), *starts]:
            fit = optimize.minimize(lambda x: -self.loglik(x), x0, method="L-BFGS-B", bounds=bounds)
            x = fit.x if np.all(np.isfinite(fit.x)) and -fit.fun > self.loglik(x0) else x0
            if best is None or self.loglik(x) > self.loglik(best):
                best = x
        return best


@dataclass(frozen=True)
class HeightGrowth:
    """The likelihood-ratio test of an error noise that grows with the force-field height."""

    statistic: float    # 2 (loglik with kappa - loglik without), both at their maxima
    p_value: float      # under kappa = 0: half the chi2_1 tail (kappa >= 0 sits on the boundary)
    kappa: float        # the maximum-likelihood kappa (energy per energy of height)
    n: int              # prospective errors tested


def height_growth(residual, spread, height) -> HeightGrowth | None:
    """Do the prospective errors grow with the force-field height more than the default law allows?

    The default law (``error_law = "spread_and_noise"``) gives every structure the same noise; the
    campaign measures the low structures first, so if the high ones are noisier, a constant noise
    fitted on the picks understates the errors of the structures it leaves unmeasured, and with them
    the stated risk (the synthetic landscape whose noise grows with the height: about half the
    truth, benchmarks/README.md). The height law (``"spread_noise_height"``) nests the default one
    at kappa = 0, so the likelihood-ratio statistic ``2 (max loglik_height - max loglik_default)``
    tests it. kappa >= 0 lies on the boundary of the nesting law's space, so under kappa = 0 the
    statistic is chi2_0 and chi2_1 with probability 1/2 each (Self and Liang, JASA 82:605, 1987): the
    p-value is half the chi2_1 tail. Both maxima are continuous (L-BFGS-B from their grids' best;
    the height law's also from the default law's maximum at kappa = 0, so the statistic is never
    negative). None with fewer than ``MIN_PROSPECTIVE`` errors, no spread in the heights, or
    every error exactly 0 (no law to fit).
    Its size, measured on errors drawn from the default law (t of 4 df, spread grown by 1.3, a
    noise of 0.6 spreads, gamma-distributed heights; 400 draws each, 2026-12-08): P(p < 0.05) =
    5.25 % with 60 errors and 5.5 % with 250, P(p < 0.01) = 1.5 % and 1.25 %. `graceq status` shows it.
    """
    r = np.asarray(residual, dtype=np.float64).ravel()
    s = np.asarray(spread, dtype=np.float64).ravel()
    h = np.asarray(height, dtype=np.float64).ravel()
    keep = np.isfinite(r) & np.isfinite(s) & (s > 0) & np.isfinite(h)
    r, s, h = r[keep], s[keep], h[keep]
    if len(r) < MIN_PROSPECTIVE or not np.ptp(h) > 0 or not np.any(r != 0):
        return None
    return _height_growth(r.tobytes(), s.tobytes(), h.tobytes())


@functools.lru_cache(maxsize=4)
def _height_growth(residual: bytes, spread: bytes, height: bytes) -> HeightGrowth:
    """:func:`height_growth` on checked float64 arrays (as bytes), kept for the next call on the same
    errors (`graceq report` states it in its facts and draws it in error_law.png)."""
    r, s, h = (np.frombuffer(v, dtype=np.float64) for v in (residual, spread, height))
    flat, tall = _LawSpace(r, s), _LawSpace(r, s, h)
    laws = error_laws(r, s, 0.0)
    x0 = flat.maximum(laws, flat.bounds(flat.point(laws[0])))
    laws_h = error_laws(r, s, 0.0, height=h)
    x1 = tall.maximum(laws_h, tall.bounds(tall.point(laws_h[0])), starts=[np.append(x0, 0.0)])
    statistic = max(2.0 * (tall.loglik(x1) - flat.loglik(x0)), 0.0)
    return HeightGrowth(statistic=float(statistic), p_value=float(0.5 * stats.chi2.sf(statistic, 1)),
                        kappa=float(tall.law(x1).kappa), n=int(len(r)))


#: unmeasured structures the search for the largest risk over the likelihood region sums over (the
#: risk at the law it finds is then summed over all of them): a sample stratified by probability
REGION_SAMPLE = 4096


def region_expected_missed(mu, spread, threshold: float, laws, errors, confidence: float = 0.95,
                           height=None, noise: bool = True) -> tuple[float, ErrorLaw | None]:
    """The largest expected number of unmeasured window structures over *every* t law that the
    prospective errors leave plausible, not only over ``laws``: the upper end of the risk's
    profile-likelihood confidence interval, and the law that gives it.

    The risk ``R(theta) = sum_i F_df((T - mu_i) / w_i)`` is one scalar function of the law's
    parameters theta = (df, scale, noise[, kappa]); by Wilks its profile likelihood is chi2_1, so its
    upper confidence bound at ``confidence`` is ``max R(theta)`` subject to
    ``loglik(theta) >= loglik_max - chi2_1(confidence) / 2``. ``laws`` (:func:`error_laws`) hold
    the maximum-likelihood path over df and its edges, every other parameter at its best for each df;
    the maximum of R over them is the region's only when the risk grows along that path alone. It
    does not in general: a heavier height term with a lighter tail and a wider scale can be as
    plausible as the path's laws and state twice their risk (the synthetic landscape whose noise
    grows with the height, benchmarks/README.md). So the largest risk is sought over the region
    itself (SLSQP, from the largest of ``laws``, in log df, log scale and the noise and kappa in
    units of the errors' median spread), constrained to the cut, with ``loglik_max`` the continuous
    maximum (L-BFGS-B from the best of ``laws``: the grid steps by 1.5x in the noise and 2.5x in
    the height term, and its best can lie whole units of log-likelihood lower, which would widen
    the region). The search sums over at most
    ``REGION_SAMPLE`` of the unmeasured structures (every k-th by the largest law's probability,
    weighted by k); the risk returned is the exact sum at the law found, whose log-likelihood is
    checked to be above the cut (else it is pulled back along the segment from the start). The
    result is never below ``expected_missed`` over ``laws`` (the statement before this search; a
    law of the grid's set may lie just outside the continuous region, and is kept as a floor). On a
    pool with more than ``REGION_SAMPLE`` unmeasured structures that floor's law is chosen on the
    sample too (:func:`_path_maximum_on_sample`) and only the few largest are summed whole.

    ``errors``: the prospective errors ``(residual, spread, height or None)`` the laws were fitted
    on (:func:`prospective_errors`), their heights None unless the law grows with the height (then
    kappa is searched too); ``height``: the unmeasured structures' force-field heights; ``noise``
    False: the laws of the spread alone (``error_law = "spread"``), whose noise stays 0.
    """
    mu, spread = _check(mu, spread)
    sample = None
    if len(mu) > REGION_SAMPLE and laws:
        # the path ranked on the search's sample (stratified by the heaviest law), only its largest summed whole
        risk, best, sample = _path_maximum_on_sample(mu, spread, threshold, laws, height)
    else:
        risk, best = expected_missed(mu, spread, threshold, laws, height)
    if best is None or len(mu) == 0 or not np.isfinite(risk) or risk <= 0:
        return risk, best
    space = _LawSpace(*errors, noise=noise)
    hu = np.zeros(len(mu)) if height is None else np.asarray(height, dtype=np.float64).ravel()
    start = space.point(best)
    bounds = space.bounds(start)
    top = space.maximum(laws, bounds)
    cut = space.loglik(top) - stats.chi2.ppf(confidence, 1) / 2.0
    # the search's sample: every k-th structure by the largest law's probability, weight k (on a
    # large pool, by the heaviest law's: the sample the path was ranked on)
    if sample is None:
        sample = _stratified(best.p_below(threshold, mu, spread, hu))
    mu_s, sp_s, h_s, weight = mu[sample], spread[sample], hu[sample], len(mu) / len(sample)

    def neg_log_risk(x):
        """-log of the sample's risk and its gradient: analytic in the scale, the noise and kappa
        (through the t density), a forward difference in log df (one more cdf of the sample), where
        SLSQP's own differences cost a cdf per parameter."""
        law = space.law(x)
        z, w = law.gaps(threshold, mu_s, sp_s, h_s)
        total = float(np.sum(special.stdtr(law.df, z)))
        if not total > 0:
            return -np.log(1e-300), np.zeros(len(x))   # as the floor below: no risk in the sample
        step = 1e-7
        grad = [-(float(np.sum(special.stdtr(law.df * np.exp(step), z))) - total) / step]
        finite = np.isfinite(z) & (w > 0)
        zf, wf = z[finite], w[finite]
        # dF/dtheta = pdf(z) dz/dtheta, dz/dtheta = -z / w dw/dtheta, w dw/dtheta: a^2 s^2 (log a),
        # eps unit (noise, in units of `unit`), kappa h^2 unit / h_unit (kappa, the same)
        dz = -np.exp(_t_logpdf(zf, law.df, 0.0)) * zf / wf ** 2
        grad.append(-float(np.sum(dz * (law.scale * sp_s[finite]) ** 2)))
        if space.with_noise:
            grad.append(-float(np.sum(dz)) * law.noise * space.unit)
        if space.with_kappa:
            grad.append(-float(np.sum(dz * h_s[finite] ** 2)) * law.kappa * space.unit / space.h_unit)
        return -np.log(max(weight * total, 1e-300)), np.asarray(grad) / total

    if space.loglik(start) < cut:        # the set's largest law is outside the region: start at its top
        start = top
    try:
        found = optimize.minimize(neg_log_risk, start, jac=True, method="SLSQP", bounds=bounds,
                                  constraints=[{"type": "ineq", "fun": lambda x: space.loglik(x) - cut}],
                                  options={"maxiter": 100, "ftol": 1e-8}).x
    except (ValueError, FloatingPointError):
        return risk, best
    if not np.all(np.isfinite(found)):
        return risk, best
    if space.loglik(found) < cut:        # SLSQP stops at the constraint to its tolerance: pull back inside
        lo, hi = 0.0, 1.0
        for _ in range(50):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if space.loglik(start + mid * (found - start)) >= cut else (lo, mid)
        found = start + lo * (found - start)
    law = space.law(found)
    value = float(np.sum(law.p_below(threshold, mu, spread, hu)))
    return (value, law) if value > risk else (risk, best)


#: laws of the df path summed over every unmeasured structure when the path is ranked on a sample
PATH_EXACT = 2


def _stratified(p: np.ndarray) -> np.ndarray:
    """At most ``REGION_SAMPLE`` indices of ``p``, every k-th in increasing order of ``p`` (all of
    them, in that order, when there are no more): a sample whose strata are the probabilities."""
    stride = max(1, -(-len(p) // REGION_SAMPLE))
    return np.argsort(p, kind="stable")[stride // 2::stride]


def _path_maximum_on_sample(mu, spread, threshold, laws, height) -> tuple[float, ErrorLaw, np.ndarray]:
    """:func:`expected_missed` over ``laws`` on a large pool, at a fraction of its cost: every law's
    sum estimated on a sample (:func:`_stratified` by the heaviest law's probabilities), and the
    ``PATH_EXACT`` largest estimates summed over every structure; the largest of those exact sums,
    its law, and the sample (the region search's). Each law's exact sum costs a t cdf per
    unmeasured structure, 15-25 ms on 100,000, and a path holds 4-30 laws: summed whole, the path
    took a fifth of an arrival's decision on a large pool. The sample only ranks; the value is
    exact. Neighbouring laws of the path differ in their sums by far more than the sample's error,
    whose strata are the probabilities themselves, and the path's maximum is only the region
    search's floor (the search covers every law of the path)."""
    heaviest = min(range(len(laws)), key=lambda k: laws[k].df)
    p_heaviest = laws[heaviest].p_below(threshold, mu, spread, height)
    sample = _stratified(p_heaviest)
    hs = None if height is None else np.asarray(height, dtype=np.float64)[sample]
    estimate = [float(np.sum(lw.p_below(threshold, mu[sample], spread[sample], hs))) for lw in laws]
    top = [int(k) for k in np.argsort(estimate, kind="stable")[::-1][:PATH_EXACT]]
    # the heaviest law's probabilities are already summed over every structure: not again
    exact = {k: float(np.sum(p_heaviest)) if k == heaviest else
             float(np.sum(laws[k].p_below(threshold, mu, spread, height))) for k in top}
    k = max(top, key=exact.get)
    return exact[k], laws[k], sample


#: the forecasters of a structure's reference energy that ``acquisition = "p_window"`` chooses
#: between, each a location and a scale per structure (energy per molecule); the first, the
#: campaign's committee, ranks unless the measurements show another to forecast better
FORECASTERS = ("committee", "committee_mean", "force_field")
#: what ranks the picks under each forecaster, in words (``graceq status``)
FORECASTER_MEANING = {
    "committee": "the committee's probability of the window (its mean and spread)",
    "committee_mean": "the committee's mean alone (its mean has forecast the measured energies better "
                      "than its mean and spread)",
    "force_field": "the force field's energy (it has forecast the measured energies better than the committee)",
}
#: confidence at which a forecaster must beat the committee to rank the batch (Vuong's test)
SWITCH_CONFIDENCE = 0.95


def forecast_logdensity(energy_ref, loc, scale) -> np.ndarray:
    """Log density of each reference energy (per molecule) under the forecast
    ``E ~ loc + scale * t``, the t law's tail and scale fitted by maximum likelihood (profile
    over ``DF_GRID``) to all of them; empty with fewer than ``MIN_PROSPECTIVE`` usable forecasts.

    Every forecaster compared this way has the same two fitted parameters (tail, scale factor),
    so the sums of two such arrays differ as their AIC halves do (Dawid's prequential principle:
    a forecaster is judged by the forecasts it made before each measurement, not by its fit).
    """
    e = np.asarray(energy_ref, dtype=np.float64)
    loc = np.asarray(loc, dtype=np.float64)
    scale = np.broadcast_to(np.asarray(scale, dtype=np.float64), e.shape)
    if not (np.isfinite(e) & np.isfinite(loc) & np.isfinite(scale) & (scale > 0)).all() or len(e) < MIN_PROSPECTIVE:
        return np.zeros(0)
    z = (e - loc) / scale
    if not np.any(z != 0):
        raise ValueError("every forecast was exactly the measured energy")
    law = max(_profile(z), key=lambda law: law.loglik(z))
    return _t_logpdf(z, law.df, np.log(law.scale)) - np.log(scale)   # density of E = loc + scale * z


def best_forecaster(energy_ref, forecasts: dict, confidence: float = SWITCH_CONFIDENCE) -> tuple[str | None, dict]:
    """The forecaster that ranks the batch, and Vuong's statistic of each against the first.

    ``forecasts``: name -> (loc, scale) arrays aligned with ``energy_ref``, the first being the
    default (the committee). Another forecaster replaces it only when Vuong's test for
    non-nested models rejects, at ``confidence`` (one-sided), that it forecasts no better:
    ``sqrt(n) mean(d) / std(d) > z_confidence`` with ``d_i`` the difference of the two log
    densities of measurement i. Of several that pass, the one with the largest log-likelihood
    ranks. None (and an empty dict) while fewer than ``MIN_PROSPECTIVE`` forecasts exist.
    """
    names = list(forecasts)
    logd = {name: forecast_logdensity(energy_ref, *forecasts[name]) for name in names}
    if not names or len(logd[names[0]]) == 0:
        return None, {}
    default = logd[names[0]]
    vuong, passed = {}, []
    for name in names[1:]:
        if len(logd[name]) != len(default):
            continue
        d = logd[name] - default
        sd = float(np.std(d, ddof=1))
        vuong[name] = float(np.sqrt(len(d)) * np.mean(d) / sd) if sd > 0 else 0.0
        if vuong[name] > stats.norm.ppf(confidence):
            passed.append(name)
    if not passed:
        return names[0], vuong
    return max(passed, key=lambda name: float(np.sum(logd[name]))), vuong


def energy_density(mu, sigma, grid) -> np.ndarray:
    """Return the predicted number of structures per energy unit at each ``grid`` energy: the sum
    of normal densities N(mu_i, sigma_i) (structures with sigma == 0 are left out: a delta)."""
    mu, sigma = _check(mu, sigma)
    grid = np.asarray(grid, dtype=np.float64)
    keep = sigma > 0
    mu, sigma = mu[keep], sigma[keep]
    out = np.zeros(grid.shape)
    flat = out.reshape(-1)
    g = grid.reshape(-1)
    for lo in range(0, len(mu), 4096):      # bounds the (grid, block) temporary
        z = (g[:, None] - mu[None, lo:lo + 4096]) / sigma[None, lo:lo + 4096]
        flat += np.sum(np.exp(-0.5 * z * z) * _INV_SQRT_2PI / sigma[None, lo:lo + 4096], axis=1)
    return out


def cumulative_count(mu, sigma, grid) -> np.ndarray:
    """Return the expected number of structures with energy <= each ``grid`` energy
    (sum of normal CDFs; a step where sigma == 0)."""
    mu, sigma = _check(mu, sigma)
    grid = np.asarray(grid, dtype=np.float64)
    g = grid.reshape(-1)
    out = np.zeros(g.shape)
    for lo in range(0, len(mu), 4096):
        out += np.sum(_normal_cdf(g[:, None], mu[None, lo:lo + 4096], sigma[None, lo:lo + 4096]), axis=1)
    return out.reshape(grid.shape)
