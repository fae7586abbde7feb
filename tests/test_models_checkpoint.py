"""Checkpoints: exact round trip with no flags, config round trip, clear errors for bad files."""

import json

import pytest
import torch

from iddpm_core.checkpoint import load_checkpoint, load_model, save_checkpoint
from iddpm_core.diffusion import DiffusionConfig
from iddpm_core.models import ModelConfig, build_model
from helpers import randomize_


pytestmark = pytest.mark.usefixtures("one_thread")



CONFIGS = [
    ModelConfig(image_size=8, in_channels=3, base_channels=8, channel_mult=(1, 2), attention_resolutions=(4,),
                num_heads=2, num_classes=3, learn_sigma=False, dropout=0.1),
    ModelConfig(kind="cunet", image_size=8, in_channels=1, base_channels=8, channel_mult=(1, 2),
                attention_resolutions=(4,), num_heads=2, solver="euler", solver_steps=2),
]


@pytest.mark.parametrize("config", CONFIGS, ids=["unet", "cunet"])
def test_saved_and_loaded_model_reproduces_output_exactly(tmp_path, config):
    model = randomize_(build_model(config)).eval()
    x = torch.randn(2, config.in_channels, 8, 8)
    t = torch.tensor([7.0, 640.0])
    y = torch.tensor([0, 2]) if config.num_classes else None
    with torch.no_grad():
        want = model(x, t, y)
    path = tmp_path / "ckpt" / "model.pt"
    save_checkpoint(path, model, config, step=12, ema_rate=0.9999, note={"a": [1, 2]},
                    diffusion_config=DiffusionConfig().to_dict())  # load_model reads trainer checkpoints
    sm = load_model(path)
    loaded, cfg, ckpt = sm.model, sm.model_config, load_checkpoint(path)
    assert cfg == config
    assert ckpt["step"] == 12 and ckpt["ema_rate"] == 0.9999 and ckpt["note"] == {"a": [1, 2]}
    assert ckpt["format"] == "iddpm-checkpoint" and ckpt["version"] == 1
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), want)
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]  # no temporary file left behind


def test_config_dict_is_json_safe_and_round_trips():
    cfg = ModelConfig(channel_mult=(1, 2, 2, 2), attention_resolutions=(16, 8), num_classes=10)
    d = json.loads(json.dumps(cfg.to_dict()))
    back = ModelConfig.from_dict(d)
    assert back == cfg and isinstance(back.channel_mult, tuple) and isinstance(back.attention_resolutions, tuple)
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        ModelConfig.from_dict({**d, "widht": 3})


def test_missing_and_corrupt_files_name_the_file(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_model(missing)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="corrupt.pt"):
        load_checkpoint(corrupt)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(ValueError, match="foreign.pt.*iddpm-checkpoint"):
        load_checkpoint(foreign)
    good = tmp_path / "good.pt"
    model = build_model(CONFIGS[0])
    save_checkpoint(good, model, CONFIGS[0])
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(ValueError, match="truncated.pt"):
        load_model(truncated)
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(tmp_path / "x.pt", model, CONFIGS[0], format="other")


def test_torch_load_reason_is_one_line_without_the_weights_only_advice(tmp_path):
    from iddpm_core.checkpoint import torch_load_reason

    evil = tmp_path / "evil.pt"
    torch.save({"f": object()}, evil)  # an object weights_only refuses to build
    with pytest.raises(Exception) as info:
        torch.load(evil, weights_only=True)
    reason = torch_load_reason(info.value)
    assert reason.startswith(type(info.value).__name__ + ": ")
    assert "\n" not in reason and "weights_only" not in reason
    assert torch_load_reason(RuntimeError("first part. second part")) == "RuntimeError: first part"
    assert torch_load_reason(EOFError()) == "EOFError"
