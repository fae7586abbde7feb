"""`iddpm-train` and `iddpm-sample`: thin click front ends over iddpm_core.train / sample."""

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="iddpm")
def train_main():
    """Train Improved-DDPM diffusion models."""
