"""`iddpm-eval recall A B`: precision, recall, density and coverage; A is the reference (real) set."""

from __future__ import annotations

import json

import click

from iddpm_eval.cli.fid import result_rows, run_compare, source_options
from iddpm_eval.cli.outputs import record


@click.command("recall")
@click.argument("a")
@click.argument("b")
@source_options
@click.option("--k", type=click.IntRange(min=1), default=3, show_default=True, help="Nearest neighbour for the radii.")
@click.option("--fid/--no-fid", "with_fid", default=True, show_default=True,
              help="Also report FID from the same features.")
def recall(a, b, mode, num, batch_size, seed, weights, device, as_json, results, experiment, save_features,
           no_progress, sample_steps, sampler, k, with_fid):
    """Precision/recall/density/coverage of B (generated) against A (reference, real), k-NN balls on
    Inception pool features. Sources as for `iddpm-eval fid`."""
    out = run_compare(a, b, as_json=as_json, results=results, experiment=experiment, no_progress=no_progress,
                      mode=mode, num=num, batch_size=batch_size, seed=seed, weights=weights, device=device,
                      save_features=save_features, sample_steps=sample_steps, sampler=sampler, pr=True, k=k)
    if not with_fid:
        out.pop("fid")
    if as_json:
        click.echo(json.dumps(out, sort_keys=True))
    else:
        click.echo(f"reference (real) set: A = {a} ({out['n_real']} images); generated: B = {b} ({out['n_fake']})")
        click.echo("precision {precision:.4f}  recall {recall:.4f}  density {density:.4f}  coverage {coverage:.4f}"
                   "  (k={k}, {mode})".format(**out))
        if "fid" in out:
            click.echo(f"FID {out['fid']:.4f}")
        click.echo(f"weights sha256 {out['weights_sha256']}")
    if results:  # printed first, so a failed write loses nothing the user has not seen
        record(results, result_rows(out, [("precision", "precision", None, None), ("recall", "recall", None, None),
                                          ("density", "density", None, None), ("coverage", "coverage", None, None),
                                          ("fid", "fid", None, None)], experiment))
