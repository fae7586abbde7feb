"""The run-config flags of every training command, generated from the config dataclasses.

Each field of :class:`~iddpm_core.models.ModelConfig`, :class:`~iddpm_core.diffusion.DiffusionConfig`
and :class:`~iddpm_core.config.TrainConfig` becomes a flag ``--field-name`` (a few are renamed, a
few left to config files: see ``RENAMED`` and ``HIDDEN``) whose default is the field's default and
whose help is the comment beside the field, so a new field gets its flag without further work.
:func:`config_options` makes the click options; :func:`build_run_config` is the one merge: the
config file (or a resumed checkpoint's config), then the flags given explicitly over it.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from functools import lru_cache

import click
from click.core import ParameterSource

# Fields with no flag (set them in a config file).
HIDDEN = {("model", "rtol"), ("model", "atol"), ("model", "adjoint"), ("model", "max_num_steps"),
          ("diffusion", "rescale_timesteps"), ("diffusion", "timestep_respacing")}
# Flags whose name is not the field's.
RENAMED = {("model", "kind"): "model_kind", ("model", "use_scale_shift_norm"): "scale_shift",
           ("diffusion", "steps"): "diffusion_steps"}
# Fields left to the data unless given: no default on the flag.
FROM_DATA = {("model", "image_size"), ("model", "in_channels"), ("model", "attention_resolutions")}
# Help of fields whose class carries no comment for them.
HELP = {("model", "image_size"): "Default: the data's.", ("model", "in_channels"): "Default: the data's.",
        ("model", "channel_mult"): "e.g. '1,2,2' (default: per image size).",
        ("model", "attention_resolutions"): "e.g. '16' or '' for none (default: 16 when the model has that "
                                            "level, else the largest level below 16).",
        ("model", "num_classes"): "Class-conditional model with this many classes.",
        ("model", "solver"): "cunet ODE solver.", ("diffusion", "steps"): "T.",
        ("diffusion", "loss"): "simple, hybrid, vlb, mse, rescaled_mse, kl, rescaled_kl."}


def _ints(s):
    s = s.strip()
    return tuple(int(v) for v in s.split(",")) if s else ()


def _opt_ints(s):
    """'' -> None (the default for the image size), else a tuple of ints."""
    return _ints(s) or None


def _floats(s):
    s = s.strip()
    return tuple(float(v) for v in s.split(",")) if s else ()


def _opt_int(s):
    return None if str(s).lower() in ("", "none", "0") else int(s)


_EXPECTED = {_ints: "comma-separated integers such as 1,2,2", _opt_ints: "comma-separated integers such as 1,2,2",
             _floats: "comma-separated numbers such as 0.9999", _opt_int: "an integer or 'none'"}


def _classes():
    from iddpm_core.config import TrainConfig
    from iddpm_core.diffusion.config import DiffusionConfig
    from iddpm_core.models import ModelConfig

    return (("model", ModelConfig), ("diffusion", DiffusionConfig), ("train", TrainConfig))


def _choices() -> dict:
    from iddpm_core.config import SAMPLERS
    from iddpm_core.diffusion.gaussian import MEAN_TYPES, VAR_TYPES
    from iddpm_core.diffusion.schedules import SCHEDULES
    from iddpm_core.models.config import KINDS
    from iddpm_core.precision import PRECISIONS

    return {("model", "kind"): KINDS, ("diffusion", "schedule"): SCHEDULES, ("diffusion", "mean_type"): MEAN_TYPES,
            ("diffusion", "var_type"): VAR_TYPES, ("train", "timestep_sampler"): SAMPLERS,
            ("train", "precision"): PRECISIONS}


def field_comments(cls) -> dict:
    """{field: its comment} in the source of dataclass ``cls``: the ``# comment`` on the field's
    line, continued by comment-only lines right below it."""
    found, last = {}, None
    for line in inspect.getsource(cls).splitlines():
        field_line = re.match(r"\s*(\w+)\s*:[^#]*?(?:#\s*(.*))?$", line)
        more = re.match(r"\s*#\s*(.*)$", line)
        if more and last in found:
            found[last] += " " + more.group(1).strip()
        elif field_line and not more:
            last = field_line.group(1)
            if field_line.group(2):
                found[last] = field_line.group(2).strip()
        else:
            last = None
    return found


@dataclasses.dataclass(frozen=True)
class Flag:
    """One generated flag: its name (underscores), the config field it sets and how its text is converted."""

    name: str
    section: str
    field: str
    convert: object = None       # None: click's type already gives the field's value

    def value(self, raw):
        """The flag's value for the config; a bad value is refused naming the flag."""
        if self.convert is None or raw is None or isinstance(raw, bool):
            return raw
        try:
            return self.convert(raw)
        except ValueError:
            raise click.BadParameter(f"{raw!r} is not {_EXPECTED.get(self.convert, 'a valid value')}",
                                     param_hint=f"--{self.name.replace('_', '-')}") from None


def _option(section: str, f: dataclasses.Field, comments: dict, choices: dict) -> tuple:
    """(Flag, click declarations, click attributes) for field ``f`` of ``section``."""
    key, default, kind = (section, f.name), f.default, str(f.type)
    name = RENAMED.get(key, f.name)
    dashed = "--" + name.replace("_", "-")
    help_text = HELP.get(key) or comments.get(f.name)
    if help_text:
        help_text += "" if help_text.endswith(".") else "."
    attrs = dict(default=default, show_default=True, help=help_text)
    convert = None
    if isinstance(default, bool):
        decls = [f"{dashed}/--no-{dashed[2:]}", name]
    else:
        decls = [dashed, name]
        if key in choices:
            attrs["type"] = click.Choice(list(choices[key]))
        elif kind.startswith("tuple"):
            floats = any(isinstance(v, float) for v in default or ())
            convert = _floats if floats else (_opt_ints if "None" in kind else _ints)
            attrs["default"] = "" if default is None else ",".join(str(v) for v in default)
            attrs["show_default"] = bool(default)
        elif kind == "int | None":
            convert, attrs["default"], attrs["show_default"] = _opt_int, "none", False
        elif type(default) in (int, float):
            attrs["type"] = type(default)
        else:
            attrs["show_default"] = default is not None
    if key in FROM_DATA:
        attrs["default"], attrs["show_default"] = None, False
    return Flag(name, section, f.name, convert), decls, attrs


@lru_cache(maxsize=1)
def _generated() -> tuple:
    choices, out = _choices(), []
    for section, cls in _classes():
        comments = field_comments(cls)
        out += [_option(section, f, comments, choices) for f in dataclasses.fields(cls)
                if (section, f.name) not in HIDDEN]
    return tuple(out)


def config_flags() -> dict:
    """{flag name: Flag} of every generated flag, in field order."""
    return {flag.name: flag for flag, _, _ in _generated()}


def config_file_option() -> click.Option:
    """``--config FILE``: the run config the flags override."""
    return click.Option(["--config", "config_file"], type=click.Path(dir_okay=False), default=None,
                        help="Run config (.json or .toml with [model], [diffusion], [train]); flags override it.")


def config_options(skip=()) -> list[click.Option]:
    """New click options for every generated flag except the names in ``skip``, in field order."""
    return [click.Option(decls, **attrs) for flag, decls, attrs in _generated() if flag.name not in skip]


def explicit(ctx: click.Context, name: str) -> bool:
    """Whether flag ``name`` was given (on the command line or through the environment)."""
    return ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)


def given_fields(ctx: click.Context, values: dict) -> dict:
    """The generated flags given explicitly, as {section: {field: value}} (converted)."""
    out: dict = {"model": {}, "diffusion": {}, "train": {}}
    for name, flag in config_flags().items():
        if name in values and explicit(ctx, name):
            out[flag.section][flag.field] = flag.value(values[name])
    return out


def build_run_config(ctx: click.Context, values: dict, config_file=None, stored: dict | None = None) -> dict:
    """The run-config dict of a command: ``stored`` (a resumed checkpoint's config; the flags may
    change only what a resume may change) or the config file (or nothing: the defaults), then the
    flags given explicitly over it; a fresh run's missing model fields are completed from its data."""
    from iddpm_core.config import RunConfig, check_resume_changes, complete_model_config

    given = given_fields(ctx, values)
    if stored is not None:  # before the merged config is validated, so the message names the flags
        check_resume_changes(stored, given)
        base = stored
    else:
        base = RunConfig.read_file(config_file) if config_file else {"model": {}, "diffusion": {}, "train": {}}
    for section, fields in given.items():
        base[section].update(fields)
    if stored is None:
        complete_model_config(base)
    return base
