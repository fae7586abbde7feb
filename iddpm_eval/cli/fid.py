"""`iddpm-eval fid A B`: FID (and KID, sFID, precision/recall) between two sources."""

from __future__ import annotations

import json

import click

from iddpm_eval.cli.outputs import record

MODES = ("legacy-tf", "clean")  # iddpm_eval.preprocess.MODES, without importing torch for --help
FEATURES = ("inception", "dinov2-vitb14", "dinov2-vitl14")  # extractors (iddpm_eval.dinov2.ARCHS)
METRIC_NAMES = {"inception": "fid", "dinov2-vitb14": "fd_dinov2", "dinov2-vitl14": "fd_dinov2"}


def source_options(f):
    """Flags shared by fid and recall."""
    opts = [
        click.option("--mode", type=click.Choice(list(MODES)), default="legacy-tf", show_default=True,
                     help="Inception preprocessing: legacy-tf (TF1 bilinear, published numbers) or clean (PIL "
                          "bicubic). DINOv2 features always use EDM2's (recorded as mode edm2)."),
        click.option("--features", "--detector", "features", type=click.Choice(list(FEATURES)), default="inception",
                     show_default=True,
                     help="Feature extractor: inception (FID: Inception-2015-12-05 pool_3, 2048) or dinov2-vitb14 / "
                          "dinov2-vitl14 (FD_DINOv2 as EDM2: bicubic antialiased resize to 224, ImageNet "
                          "normalisation, class token; 768 / 1024 dims; timm architecture, official weights)."),
        click.option("--dinov2-weights", type=click.Path(dir_okay=False), default=None,
                     help="Official dinov2_vit*14_pretrain.pth (default $IDDPM_DINOV2_WEIGHTS, then the torch hub "
                          "cache)."),
        click.option("--dinov2-sha256", default=None, help="Refuse DINOv2 weights whose sha256 differs."),
        click.option("--num", type=click.IntRange(min=2), default=None,
                     help="Use N images (or cached features) per source, drawn with --seed; default all."),
        click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True),
        click.option("--seed", type=int, default=0, show_default=True,
                     help="Seed of --num subsets, KID subsets and bootstrap resampling."),
        click.option("--weights", type=click.Path(dir_okay=False), default=None,
                     help="Inception weights file (default: the offline NVIDIA TorchScript)."),
        click.option("--device", default=None, help="torch device (default: cuda if available, else cpu)."),
        click.option("--json", "as_json", is_flag=True, help="Print one JSON object."),
        click.option("--results", type=click.Path(dir_okay=False), default=None,
                     help="Append the metrics to this results table (CSV)."),
        click.option("--experiment", default=None, help="Experiment name for --results (default: 'A vs B')."),
        click.option("--save-features", type=click.Path(file_okay=False), default=None,
                     help="Folder receiving a.npz / b.npz (statistics + features) to reuse as sources."),
        click.option("--no-progress", is_flag=True, help="Hide progress bars."),
        click.option("--sample-steps", type=click.IntRange(min=1), default=None,
                     help="Checkpoint sources: sampling steps (respaced; default the full chain)."),
        click.option("--sampler", type=click.Choice(["ddpm", "ddim"]), default="ddpm", show_default=True,
                     help="Checkpoint sources: sampler."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _check_outputs(a, b, results, experiment, save_features) -> None:
    """Before computing: the results table, the experiment name, the features folder."""
    from iddpm_eval.cli.outputs import check_output, check_results

    check_results(results, experiment if experiment is not None else f"{a} vs {b}")
    check_output(save_features, "--save-features", folder=True)


def run_compare(a, b, *, as_json, results, experiment, no_progress, **kw) -> dict:
    from iddpm_core.data import DataError
    from iddpm_eval.measure import compare

    _check_outputs(a, b, results, experiment, kw.get("save_features"))
    try:
        return compare(a, b, progress=not no_progress, **kw)
    except (DataError, ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from None


@click.command("fid")
@click.argument("a")
@click.argument("b")
@source_options
@click.option("--bootstrap", type=click.IntRange(min=0), default=0,
              help="Bootstrap rounds for a 95% interval (resamples images of each side with features).")
@click.option("--kid", is_flag=True, help="Also KID (torch-fidelity defaults: 100 subsets of 1000, cubic kernel).")
@click.option("--kid-subsets", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--kid-subset-size", type=click.IntRange(min=2), default=1000, show_default=True)
@click.option("--sfid", is_flag=True, help="Also sFID (mixed_6/conv features, 2023 dims).")
@click.option("--pr", is_flag=True, help="Also precision/recall/density/coverage, A as the reference (real) set.")
@click.option("--k", type=click.IntRange(min=1), default=3, show_default=True, help="Neighbours for --pr.")
@click.option("--fd-inf", is_flag=True,
              help="Also FD-infinity (Chong & Forsyth 2020): FID on subsets of growing size, extrapolated to 1/N = 0.")
@click.option("--fd-inf-points", type=click.IntRange(min=3), default=15, show_default=True,
              help="Subset sizes for --fd-inf, evenly spaced from --fd-inf-min-fraction x N to N.")
@click.option("--fd-inf-min-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.2,
              show_default=True, help="Smallest subset for --fd-inf, as a fraction of each set.")
@click.option("--fd-inf-bootstrap", type=click.IntRange(min=0), default=None,
              help="Bootstrap rounds for the FD-infinity interval (each reruns every subset size); 0: the "
                   "regression standard error's interval, cheaper but too narrow (subset noise only). Default: 50 "
                   "when both sets are smaller than the feature dimension (cheap rounds), else 0.")
def fid(a, b, mode, features, dinov2_weights, dinov2_sha256, num, batch_size, seed, weights, device, as_json, results,
        experiment, save_features, no_progress, sample_steps, sampler, bootstrap, kid, kid_subsets, kid_subset_size,
        sfid, pr, k, fd_inf, fd_inf_points, fd_inf_min_fraction, fd_inf_bootstrap):
    """FID between A and B: each a folder of images, an .npz batch, a statistics or features .npz,
    a dataset (fashion-mnist:train, fashion-mnist:test, digits, cifar10:SPLIT:FOLDER) or a trainer
    checkpoint (.pt; --num images sampled on the fly with --sample-steps, --sampler, --seed)."""
    out = run_compare(a, b, as_json=as_json, results=results, experiment=experiment, no_progress=no_progress,
                      mode=mode, num=num, batch_size=batch_size, seed=seed, weights=weights, device=device,
                      save_features=save_features, sample_steps=sample_steps, sampler=sampler,
                      bootstrap=bootstrap, kid=kid, kid_subsets=kid_subsets,
                      kid_subset_size=kid_subset_size, sfid=sfid, pr=pr, k=k, fd_inf=fd_inf,
                      fd_inf_points=fd_inf_points, fd_inf_min_fraction=fd_inf_min_fraction,
                      fd_inf_bootstrap=fd_inf_bootstrap, features=features, dinov2_weights=dinov2_weights,
                      dinov2_sha256=dinov2_sha256)
    if as_json:
        click.echo(json.dumps(out, sort_keys=True))
    else:
        _print(out, a, features, bootstrap)
    if results:  # printed first, so a failed write loses nothing the user has not seen
        from iddpm_eval.tables import comparison_rows

        record(results, comparison_rows(out, experiment, fd=METRIC_NAMES[features]))


def _print(out: dict, a: str, features: str, bootstrap: int) -> None:
    line = f"{'FID' if features == 'inception' else 'FD_DINOv2'} {out['fid']:.4f}"
    if "fid_ci_low" in out:
        line += f" (95% CI {out['fid_ci_low']:.4f} .. {out['fid_ci_high']:.4f}, {bootstrap} bootstrap rounds)"
    click.echo(f"{line}   [{out['detector']}, {out['mode']}, n_a={out['n_a']}, n_b={out['n_b']}]")
    if "fd_inf" in out:
        click.echo(f"FD-infinity {out['fd_inf']:.4f} (95% CI {out['fd_inf_ci_low']:.4f} .. {out['fd_inf_ci_high']:.4f}, "
                   f"{out['fd_inf_ci_method']}; subsets {out['fd_inf_sizes'][0]} .. {out['fd_inf_sizes'][-1]})")
        if out.get("fd_inf_note"):
            click.echo(f"note: {out['fd_inf_note']}")
    if "sfid" in out:
        ci = f" (95% CI {out['sfid_ci_low']:.4f} .. {out['sfid_ci_high']:.4f})" if "sfid_ci_low" in out else ""
        click.echo(f"sFID {out['sfid']:.4f}{ci}")
    if "kid_mean" in out:
        click.echo(f"KID {out['kid_mean']:.6f} +- {out['kid_std']:.6f} (subsets of {out['kid_subset_size']})")
    if "precision" in out:
        click.echo(f"reference (real) set: A = {a}")
        if "precision_ci_low" in out:
            for key in ("precision", "recall", "density", "coverage"):
                click.echo(f"{key} {out[key]:.4f} (95% CI {out[key + '_ci_low']:.4f} .. {out[key + '_ci_high']:.4f})")
            click.echo(f"(k={out['k']}, {bootstrap} bootstrap rounds, the same resamples as FID's)")
        else:
            click.echo("precision {precision:.4f}  recall {recall:.4f}  density {density:.4f}  coverage {coverage:.4f}"
                       "  (k={k}; --bootstrap N adds intervals)".format(**out))
    click.echo(f"weights sha256 {out['weights_sha256']}")
