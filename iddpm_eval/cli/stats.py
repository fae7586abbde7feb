"""`iddpm-eval stats SOURCE -o ref.npz`: reference statistics of a source, computed once."""

from __future__ import annotations

import json

import click

from iddpm_eval.cli.fid import FEATURES, MODES


def _npz_name(ctx, param, value):
    if value is not None and not str(value).endswith((".npz", ".pkl")):
        raise click.BadParameter(f"{value!r} does not end in .npz or .pkl; fid, recall and stats read statistics "
                                 "only from .npz files and EDM2 .pkl files")
    return value


@click.command("stats")
@click.argument("source")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), callback=_npz_name,
              help="Statistics to write: .npz (ours), or .pkl (EDM2's reference format, mu/sigma only); "
                   "fid, recall and stats read both.")
@click.option("--mode", type=click.Choice(list(MODES)), default="legacy-tf", show_default=True)
@click.option("--num", type=click.IntRange(min=2), default=None, help="Use N images drawn with --seed; default all.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--sfid", is_flag=True, help="Also store sFID statistics (mu_s, sigma_s).")
@click.option("--features", "save_features", is_flag=True,
              help="Also store the features (pool), so the file serves KID, precision/recall and bootstrap.")
@click.option("--weights", type=click.Path(dir_okay=False), default=None, help="Inception weights file.")
@click.option("--detector", type=click.Choice(list(FEATURES)), default="inception", show_default=True,
              help="Feature network: Inception (FID) or DINOv2 (FD_DINOv2, EDM2's preprocessing).")
@click.option("--dinov2-weights", type=click.Path(dir_okay=False), default=None,
              help="Official dinov2_vit*14_pretrain.pth (default $IDDPM_DINOV2_WEIGHTS, then the torch hub cache).")
@click.option("--dinov2-sha256", default=None, help="Refuse DINOv2 weights whose sha256 differs.")
@click.option("--adm-batch", is_flag=True,
              help="Write an ADM evaluator reference batch: the images (arr_0) with mu/sigma/mu_s/sigma_s.")
@click.option("--device", default=None)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
@click.option("--no-progress", is_flag=True)
@click.option("--sample-steps", type=click.IntRange(min=1), default=None, help="Checkpoint sources: sampling steps.")
@click.option("--sampler", type=click.Choice(["ddpm", "ddim"]), default="ddpm", show_default=True)
def stats(source, output, mode, num, seed, batch_size, sfid, save_features, weights, detector, dinov2_weights,
          dinov2_sha256, adm_batch, device, as_json, no_progress, sample_steps, sampler):
    """Write mu, sigma, count, mode, weights sha256 and a fingerprint of SOURCE's images to OUTPUT.
    SOURCE is anything `iddpm-eval fid` accepts (an ADM batch's stored mu/sigma are reused)."""
    from iddpm_core import __version__
    from iddpm_core.data import DataError
    from iddpm_eval.cli.outputs import check_output
    from iddpm_eval.sources import source_statistics

    check_output(output, "-o/--output")
    try:
        st = source_statistics(source, output, mode=mode, weights=weights, num=num, seed=seed,
                               batch_size=batch_size, sfid=sfid, save_features=save_features,
                               progress=not no_progress, device=device, sample_steps=sample_steps, sampler=sampler,
                               features=detector, dinov2_weights=dinov2_weights, dinov2_sha256=dinov2_sha256,
                               adm_batch=adm_batch)
    except (DataError, ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from None
    summary = dict(output=output, source=source, n=st.count, dims=int(st.mu.shape[0]), mode=st.mode,
                   detector=st.detector,
                   weights_sha256=st.weights_sha256, fingerprint=st.fingerprint, seed=seed, num=num,
                   sfid=st.mu_s is not None, iddpm_version=__version__)
    if as_json:
        click.echo(json.dumps(summary, sort_keys=True))
    else:
        click.echo(f"wrote {output}: {st.count} images, {st.mu.shape[0]} dims, {st.detector}, mode {st.mode}, "
                   f"fingerprint {st.fingerprint}")
