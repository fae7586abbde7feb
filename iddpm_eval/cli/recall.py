"""`iddpm-eval recall A B`: precision, recall, density and coverage; A is the reference (real) set."""

from __future__ import annotations

import json

import click

from iddpm_eval.cli.fid import METRIC_NAMES, run_compare, source_options
from iddpm_eval.cli.outputs import record


@click.command("recall")
@click.argument("a")
@click.argument("b")
@source_options
@click.option("--k", type=click.IntRange(min=1), default=3, show_default=True, help="Nearest neighbour for the radii.")
@click.option("--fid/--no-fid", "with_fid", default=True, show_default=True,
              help="Also report FID from the same features.")
@click.option("--bootstrap", type=click.IntRange(min=0), default=0, show_default=True,
              help="Bootstrap rounds for 95% intervals of every metric (the same resamples for all; 0: none).")
def recall(a, b, mode, features, dinov2_weights, dinov2_sha256, num, batch_size, seed, weights, device, as_json,
           results, experiment, save_features, no_progress, sample_steps, sampler, k, with_fid, bootstrap):
    """Precision/recall/density/coverage of B (generated) against A (reference, real), k-NN balls on
    Inception pool features. Sources as for `iddpm-eval fid`."""
    out = run_compare(a, b, as_json=as_json, results=results, experiment=experiment, no_progress=no_progress,
                      mode=mode, num=num, batch_size=batch_size, seed=seed, weights=weights, device=device,
                      save_features=save_features, sample_steps=sample_steps, sampler=sampler, pr=True, k=k,
                      bootstrap=bootstrap, features=features, dinov2_weights=dinov2_weights,
                      dinov2_sha256=dinov2_sha256)
    if not with_fid:
        out.pop("fid")
    if as_json:
        click.echo(json.dumps(out, sort_keys=True))
    else:
        click.echo(f"reference (real) set: A = {a} ({out['n_real']} images); generated: B = {b} ({out['n_fake']})")
        for m in ("precision", "recall", "density", "coverage"):
            ci = f" (95% CI {out[m + '_ci_low']:.4f} .. {out[m + '_ci_high']:.4f})" if m + "_ci_low" in out else ""
            click.echo(f"{m} {out[m]:.4f}{ci}")
        click.echo(f"(k={out['k']}, {out['detector']}, {out['mode']}"
                   + (f", {bootstrap} bootstrap rounds)" if bootstrap else "; --bootstrap N adds intervals)"))
        if "fid" in out:
            ci = f" (95% CI {out['fid_ci_low']:.4f} .. {out['fid_ci_high']:.4f})" if "fid_ci_low" in out else ""
            click.echo(f"{'FID' if features == 'inception' else 'FD_DINOv2'} {out['fid']:.4f}{ci}")
        click.echo(f"weights sha256 {out['weights_sha256']}")
    if results:  # printed first, so a failed write loses nothing the user has not seen
        from iddpm_eval.tables import comparison_rows

        record(results, comparison_rows(out, experiment, fd=METRIC_NAMES[features], metrics=("prdc", "fid")))
