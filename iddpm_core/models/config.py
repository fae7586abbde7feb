"""Model configuration: one dataclass for both denoisers, stored in every checkpoint."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from iddpm_core.checks import refuse_unknown

# Channel multipliers per image size. 32 and 64 px are Improved DDPM's; 28 px (Fashion-MNIST) and
# 8 px (scikit-learn digits) halve as often as the size allows (28 -> 14 -> 7, 8 -> 4 -> 2).
DEFAULT_CHANNEL_MULT: dict[int, tuple[int, ...]] = {
    8: (1, 2, 2),
    16: (1, 2, 2),
    28: (1, 2, 2),
    32: (1, 2, 2, 2),
    64: (1, 2, 3, 4),
    128: (1, 1, 2, 3, 4),
    256: (1, 1, 2, 2, 4, 4),
}

KINDS = ("unet", "cunet")
SOLVERS = ("euler", "midpoint", "rk4", "dopri5")
FIXED_STEP_SOLVERS = ("euler", "midpoint", "rk4")


@dataclass
class ModelConfig:
    """Hyper-parameters of a denoiser. ``attention_resolutions`` are pixel sizes (16 = the 16x16 level)."""

    kind: str = "unet"
    image_size: int = 32
    in_channels: int = 3
    base_channels: int = 32
    channel_mult: tuple | None = None
    num_res_blocks: int = 1
    attention_resolutions: tuple = (16,)
    num_heads: int = 4
    dropout: float = 0.0
    learn_sigma: bool = True
    num_classes: int | None = None
    use_scale_shift_norm: bool = True
    # continuous U-Net only
    solver: str = "rk4"
    solver_steps: int = 1
    rtol: float = 1e-3
    atol: float = 1e-3
    adjoint: bool = False
    max_num_steps: int = 1000

    def __post_init__(self) -> None:
        if self.channel_mult is not None:
            self.channel_mult = tuple(int(m) for m in self.channel_mult)
        self.attention_resolutions = tuple(int(r) for r in self.attention_resolutions)

    @property
    def out_channels(self) -> int:
        return self.in_channels * (2 if self.learn_sigma else 1)

    def resolved_channel_mult(self) -> tuple[int, ...]:
        """The channel multipliers in use: the given ones or the default for ``image_size``."""
        if self.channel_mult is not None:
            return tuple(self.channel_mult)
        if self.image_size not in DEFAULT_CHANNEL_MULT:
            raise ValueError(
                f"no default channel_mult for image_size {self.image_size} "
                f"(defaults exist for {sorted(DEFAULT_CHANNEL_MULT)}); pass channel_mult explicitly")
        return DEFAULT_CHANNEL_MULT[self.image_size]

    def resolutions(self) -> tuple[int, ...]:
        """Spatial size of each level, after checking that the image halves cleanly."""
        mult = self.resolved_channel_mult()
        sizes = [self.image_size]
        for _ in range(len(mult) - 1):
            if sizes[-1] % 2:
                chain = " -> ".join(str(s) for s in sizes)
                raise ValueError(
                    f"image_size {self.image_size} cannot be halved {len(mult) - 1} times for channel_mult "
                    f"{mult}: {chain} is odd at level {len(sizes)}; use at most {len(sizes)} levels "
                    f"or an image size divisible by {2 ** (len(mult) - 1)}")
            sizes.append(sizes[-1] // 2)
        return tuple(sizes)

    def validate(self) -> None:
        """Raise ValueError naming the field when the configuration cannot build a model."""
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        for name in ("image_size", "in_channels", "base_channels", "num_heads"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be >= 1, got {self.num_res_blocks}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer or None, got {self.num_classes}")
        mult = self.resolved_channel_mult()
        if not mult or any(m < 1 for m in mult):
            raise ValueError(f"channel_mult must be non-empty positive integers, got {mult}")
        sizes = self.resolutions()
        for r in self.attention_resolutions:
            if r not in sizes:
                raise ValueError(
                    f"attention resolution {r} is not a level of this model; the levels of image_size "
                    f"{self.image_size} with channel_mult {mult} are {sizes}")
        for r, m in zip(sizes, mult):
            width = self.base_channels * m * (2 if self.kind == "cunet" else 1)
            if r in self.attention_resolutions and width % self.num_heads:
                raise ValueError(f"{width} channels at resolution {r} do not split into num_heads={self.num_heads}")
        if self.kind == "cunet":
            if self.solver not in SOLVERS:
                raise ValueError(f"solver must be one of {SOLVERS}, got {self.solver!r}")
            if self.solver_steps < 1:
                raise ValueError(f"solver_steps must be >= 1, got {self.solver_steps}")
            if self.dropout:
                raise ValueError(f"the continuous U-Net has no dropout (its ODE right-hand side must be "
                                 f"deterministic for the solver); got dropout={self.dropout}, use 0")
            if self.rtol <= 0 or self.atol <= 0:
                raise ValueError(f"rtol and atol must be positive, got {self.rtol}, {self.atol}")

    def to_dict(self) -> dict:
        """JSON-safe dict (tuples become lists); ``from_dict`` restores the tuples."""
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        refuse_unknown(d, {f.name for f in dataclasses.fields(cls)}, template="unknown ModelConfig fields {unknown}")
        return cls(**d)
