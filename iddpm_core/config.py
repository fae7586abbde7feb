"""Training configuration: :class:`TrainConfig` and :class:`RunConfig`, which bundles the model,
diffusion and training configs. Every checkpoint stores the run config as a plain dict, so loading
and resuming need no flags.

A run config file is JSON (``.json``) or TOML (``.toml``) with up to three tables ``model``,
``diffusion`` and ``train``; missing fields take their defaults, unknown fields are refused.

Also here: filling the model fields a run leaves to its data (:func:`complete_model_config`) and
the rules for resuming (:func:`load_run_config`, :func:`check_resume_changes`,
:func:`merge_resume_config`: only the train fields in ``RESUMABLE_FIELDS`` may change).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from iddpm_core.checks import refuse_unknown

SAMPLERS = ("uniform", "loss-second-moment")
# Train-config fields that may change when a run is resumed; the others must match the checkpoint.
RESUMABLE_FIELDS = ("steps", "log_interval", "sample_interval", "save_interval", "sample_num", "sample_steps",
                    "device", "precision")


class ResumeError(ValueError):
    """A run cannot be resumed as asked; the message names the file or the fields."""



def _dataclass_from_dict(cls, d: dict, where: str):
    """Build dataclass ``cls`` from ``d``, refusing unknown keys; lists become tuples where the
    default is a tuple (JSON has no tuples)."""
    _check_keys(cls, d, where)
    kwargs = {}
    for k, v in d.items():
        if isinstance(v, list):
            v = tuple(v)
        kwargs[k] = v
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from exc


@dataclass
class TrainConfig:
    """How to train. ``batch_size`` is per process (the global batch is batch_size x processes);
    ``microbatch`` splits it into chunks whose gradients are averaged (0 = no split)."""

    data: str = "digits"                 # digits, fashion-mnist:train, cifar10:train:FOLDER, an image folder
                                         # or an .npz batch
    data_root: str | None = None         # Folder of the Fashion-MNIST IDX files (None = Debian's)
    flip: bool = False                   # Random left-right flips
    batch_size: int = 64                 # Per process
    microbatch: int = 0                  # 0 = no split
    lr: float = 1e-4
    weight_decay: float = 0.0
    lr_warmup_steps: int = 0             # Linear warm-up from 0 to lr (0 = constant lr)
    ema_rates: tuple = (0.9999,)         # Comma-separated EMA rates
    ema_warmup: bool = False             # rate_k = min(rate, (1 + k) / (10 + k)) at update k
    grad_clip: float = 0.0               # Max global gradient norm (0 = off)
    timestep_sampler: str = "uniform"
    seed: int = 0
    steps: int = 1000                    # Total optimiser steps (train until this many)
    log_interval: int = 10
    sample_interval: int = 500           # A grid of samples every this many steps (0 = only at the end)
    save_interval: int = 1000            # ckpt_<step>.pt every this many steps (0 = only at the end)
    sample_num: int = 64                 # Images in the grid
    sample_steps: str = "50"             # Grid sampler steps; 'ddimK' samples with DDIM
    device: str = "auto"                 # "auto" (cuda if present), "cpu", "cuda", "cuda:1", ...
    precision: str = "fp32"              # bf16: the network under bfloat16 autocast (off by default: it was
                                         # slower than fp32 on an AVX-512-BF16 CPU without AMX; see
                                         # benchmarks/train_sample.py)

    def __post_init__(self):
        self.ema_rates = tuple(float(r) for r in (self.ema_rates if isinstance(self.ema_rates, (list, tuple))
                                                   else (self.ema_rates,)))
        self.validate()

    def validate(self) -> None:
        def need(cond, msg):  # the caller (from_dict) adds where the config came from
            if not cond:
                raise ValueError(msg)

        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(self.microbatch >= 0, f"microbatch must be >= 0 (0 = whole batch), got {self.microbatch}")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(self.lr_warmup_steps >= 0, f"lr_warmup_steps must be >= 0, got {self.lr_warmup_steps}")
        need(all(0.0 <= r < 1.0 for r in self.ema_rates), f"ema_rates must lie in [0, 1), got {self.ema_rates}")
        need(len(set(self.ema_rates)) == len(self.ema_rates), f"ema_rates repeat a rate: {self.ema_rates}")
        need(self.grad_clip >= 0, f"grad_clip must be >= 0 (0 = off), got {self.grad_clip}")
        need(self.timestep_sampler in SAMPLERS,
             f"timestep_sampler must be one of {SAMPLERS}, got {self.timestep_sampler!r}")
        need(self.steps >= 1, f"steps must be >= 1 (training steps in total), got {self.steps}")
        for name in ("log_interval", "sample_interval", "save_interval"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        need(self.log_interval >= 1, f"log_interval must be >= 1, got {self.log_interval}")
        need(self.sample_num >= 1, f"sample_num must be >= 1, got {self.sample_num}")
        spec = str(self.sample_steps)
        k = spec[4:] if spec.startswith("ddim") else spec
        need(spec == "" or (k.isdigit() and int(k) >= 1),
             f"sample_steps must be '' (the full chain), K or 'ddimK' with K >= 1, got {self.sample_steps!r}")
        from iddpm_core.precision import PRECISIONS
        need(self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {self.precision!r}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["ema_rates"] = list(self.ema_rates)
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str = "train config") -> "TrainConfig":
        return _dataclass_from_dict(cls, d, where)


def _model_config_cls():
    from iddpm_core.models import ModelConfig
    return ModelConfig


def _diffusion_config_cls():
    from iddpm_core.diffusion.config import DiffusionConfig
    return DiffusionConfig


@dataclass
class RunConfig:
    """Model, diffusion and training configs of one run."""

    model: Any = None
    diffusion: Any = None
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        if self.model is None:
            self.model = _model_config_cls()()
        if self.diffusion is None:
            self.diffusion = _diffusion_config_cls()()
        if isinstance(self.model, dict):
            self.model = _model_from_dict(self.model, "model config")
        if isinstance(self.diffusion, dict):
            self.diffusion = _diffusion_from_dict(self.diffusion, "diffusion config")
        if isinstance(self.train, dict):
            self.train = TrainConfig.from_dict(self.train)

    def to_dict(self) -> dict:
        return {"model": self.model.to_dict(), "diffusion": self.diffusion.to_dict(),
                "train": self.train.to_dict()}

    @classmethod
    def from_dict(cls, d: dict, where: str = "run config") -> "RunConfig":
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected a table with model/diffusion/train, got {type(d).__name__}")
        unknown = sorted(set(d) - {"model", "diffusion", "train"})
        if unknown:
            raise ValueError(f"{where}: unknown section(s) {unknown}; expected model, diffusion, train")
        return cls(model=_model_from_dict(d.get("model", {}), f"{where} [model]"),
                   diffusion=_diffusion_from_dict(d.get("diffusion", {}), f"{where} [diffusion]"),
                   train=TrainConfig.from_dict(d.get("train", {}), f"{where} [train]"))

    @staticmethod
    def read_file(path: str | os.PathLike) -> dict:
        """The raw tables of a .json / .toml run config file (no defaults filled in)."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {path}: no such file")
        if path.suffix not in (".json", ".toml"):
            raise ValueError(f"config file {path}: use a .json or .toml file")
        text = path.read_text()
        try:
            if path.suffix == ".json":
                d = json.loads(text)
            else:
                import tomllib
                d = tomllib.loads(text)
        except ValueError as exc:  # JSONDecodeError and TOMLDecodeError are ValueErrors
            raise ValueError(f"config file {path}: cannot parse: {exc}") from exc
        if not isinstance(d, dict):
            raise ValueError(f"config file {path}: expected a table with model/diffusion/train")
        cls_check = RunConfig.from_dict  # validates sections and fields
        cls_check(d, where=f"config file {path}")
        return {k: dict(d.get(k, {})) for k in ("model", "diffusion", "train")}

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "RunConfig":
        return cls.from_dict(cls.read_file(path), where=f"config file {path}")

    def save(self, path: str | os.PathLike) -> None:
        from iddpm_core.io import write_text
        write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")


def _model_from_dict(d: dict, where: str):
    cls = _model_config_cls()
    _check_keys(cls, d, where)
    try:
        cfg = cls.from_dict(dict(d))
        cfg.validate()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from exc
    return cfg


def _diffusion_from_dict(d: dict, where: str):
    cls = _diffusion_config_cls()
    _check_keys(cls, d, where)
    try:
        return cls.from_dict(dict(d))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from exc


def _check_keys(cls, d, where):
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected a table of fields, got {type(d).__name__}")
    refuse_unknown(d, {f.name for f in dataclasses.fields(cls)}, where, what="fields")


# ----------------------------------------------------------------------------- completing and resuming

def complete_model_config(d: dict) -> dict:
    """Fill a run-config dict's missing model fields from the data: ``image_size`` and ``in_channels``
    from the images' shape; ``attention_resolutions`` = (16,) when the model has a 16-pixel level, else
    the largest level below 16 that is not the full image (none for a one-level model). In place."""
    model, train_d = d.setdefault("model", {}), d.setdefault("train", {})
    if "image_size" not in model or "in_channels" not in model:
        from iddpm_core.data import load_source

        tcfg = TrainConfig.from_dict(train_d)
        h, w, c = load_source(tcfg.data, root=tcfg.data_root).shape
        if h != w:
            raise ValueError(f"data {tcfg.data!r} holds {h}x{w} images; the models need square images")
        model.setdefault("image_size", int(h))
        model.setdefault("in_channels", int(c))
    if "attention_resolutions" not in model:
        probe = _model_config_cls().from_dict({k: v for k, v in model.items() if k != "attention_resolutions"}
                                              | {"attention_resolutions": ()})
        levels = probe.resolutions()
        below = [r for r in levels if r <= 16 and r != probe.image_size]
        model["attention_resolutions"] = [16] if 16 in levels else ([max(below)] if below else [])
    return d


def _plain(v):
    return [_plain(x) for x in v] if isinstance(v, (list, tuple)) else v


def check_resume_changes(stored: dict, given: dict) -> None:
    """Refuse, naming each setting with both values, every field of ``given`` ({section: {field:
    value}}, possibly partial) that differs from the run-config dict ``stored`` of the checkpoint,
    except the train fields in RESUMABLE_FIELDS."""
    diffs = []
    for section in ("model", "diffusion", "train"):
        for k, v in sorted((given.get(section) or {}).items()):
            old = (stored.get(section) or {}).get(k)
            if not (section == "train" and k in RESUMABLE_FIELDS) and _plain(old) != _plain(v):
                diffs.append(f"{section}.{k} (checkpoint {_plain(old)!r}, given {_plain(v)!r})")
    if diffs:
        raise ResumeError(f"cannot resume with a different config: {', '.join(diffs)} differ from the "
                          f"checkpoint (only train.{', train.'.join(RESUMABLE_FIELDS)} may change)")


def merge_resume_config(stored: RunConfig, given: RunConfig | None) -> RunConfig:
    """The config of a resumed run: the stored one, with the given train fields in RESUMABLE_FIELDS.
    Any other difference is refused, naming the fields."""
    if given is None:
        return stored
    check_resume_changes(stored.to_dict(), given.to_dict())
    merged = copy.deepcopy(stored)
    for k in RESUMABLE_FIELDS:
        setattr(merged.train, k, getattr(given.train, k))
    merged.train.validate()
    return merged


def load_run_config(ckpt: dict, where: str) -> RunConfig:
    """The run config stored in a trainer checkpoint (``where`` names it in errors)."""
    for key in ("diffusion_config", "train_config"):
        if key not in ckpt:
            raise ResumeError(f"{where}: checkpoint has no {key}; it was not written by the trainer")
    return RunConfig.from_dict({"model": ckpt["model_config"], "diffusion": ckpt["diffusion_config"],
                                "train": ckpt["train_config"]}, where=where)
