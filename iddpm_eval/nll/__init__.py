"""Negative log-likelihood in bits/dim: the full variational bound of a diffusion model, exactly
or estimated from a few timesteps per image.

* :mod:`.bound`: every term of the bound, batched over (image, timestep) pairs, with noise that
  belongs to (image, t) (:func:`bound_terms`, :func:`pair_noise`), and the per-t breakdown;
* :mod:`.estimate`: the unbiased K-timestep estimate and its importance-sampling proposals
  (:func:`estimate_bound`, :func:`proposal`, :func:`load_profile`);
* :mod:`.run`: the resumable run of a checkpoint on a data source (:func:`evaluate`), whose
  summary carries the mean, its standard error and 95% interval (:func:`results_row` turns it into
  a results-table row); :mod:`.files`: its output folder;
* :mod:`.training`: the estimate as a training callback (:class:`TrainingNLL`).

The breakdown plot is :func:`iddpm_eval.plots.plot_breakdown`.
"""

from iddpm_eval.nll.bound import NLLError, bound_terms, breakdown, pair_noise, write_breakdown
from iddpm_eval.nll.estimate import estimate_bound, load_profile, proposal, sample_timesteps
from iddpm_eval.nll.files import default_out_dir
from iddpm_eval.nll.run import Loaded, check_options, evaluate, load, results_row
from iddpm_eval.nll.training import TrainingNLL

__all__ = ["NLLError", "bound_terms", "breakdown", "pair_noise", "write_breakdown", "estimate_bound", "load_profile",
           "proposal", "sample_timesteps", "default_out_dir", "Loaded", "check_options", "evaluate",
           "load", "results_row", "TrainingNLL"]
