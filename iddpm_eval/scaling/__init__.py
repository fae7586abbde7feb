"""Power-law scaling fits with bootstrap intervals, the compute frontier and the joint (N, D) law.

Forms, all fitted in log space (Hoffmann et al. 2022, approach 3):

- ``saturating``: y = E + A x^(-alpha), log y = logsumexp(log E, log A - alpha log x);
- ``power``:      y = A x^(-alpha), log y = log A - alpha log x;
- ``fixed-E``:    y = E0 + A x^(-alpha) with E0 given (Improved DDPM sec. 6 trend lines);
- joint:          y = E + A N^(-alpha) + B D^(-beta) (N = parameters, D = images seen).

The loss is sum_i w_i Huber_delta(log y_i - log y_pred_i) with delta = 1e-3, minimised by L-BFGS-B
with an analytic gradient and tight tolerances from the best few points of a grid of starts.
Intervals are percentile intervals of a bootstrap over runs: whole runs are drawn with
replacement (a run's checkpoints stay together), the point selection (e.g. the frontier) is
recomputed on each resample, and the fit is repeated (Besiroglu et al. 2024: tolerances matter).

Modules, one job each: ``law`` (the law in log space, its loss and gradient), ``lbfgs`` (the
optimisers), ``fit`` (fits on arrays), ``points`` (frontier, last checkpoint), ``bootstrap``
(resampling runs, percentile intervals), ``table`` (fits on a sweep table, its CSV) and
``checks`` (held-out extrapolation, IsoFLOP profiles). The names callers use are imported here.
"""

from iddpm_eval.scaling.bootstrap import percentile_ci, run_weights
from iddpm_eval.scaling.fit import Fit, compute_optimal, fit_joint, fit_power_law
from iddpm_eval.scaling.law import DELTA, FORMS, huber
from iddpm_eval.scaling.points import POINTS, frontier_mask, last_mask
from iddpm_eval.scaling.table import (X_ALIASES, ScalingResult, estimate_k, joint_fit, read_table, resolve_column,
                                      scaling_fit, write_csv)

__all__ = ["DELTA", "FORMS", "POINTS", "X_ALIASES", "Fit", "ScalingResult", "compute_optimal", "estimate_k",
           "fit_joint", "fit_power_law", "frontier_mask", "huber", "joint_fit", "last_mask", "percentile_ci",
           "read_table", "resolve_column", "run_weights", "scaling_fit", "write_csv"]
