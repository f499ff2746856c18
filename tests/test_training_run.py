"""A short training run on the built-in data learns, and its checkpoint reproduces the model."""
import json

import torch

from dream.checkpoint import load_model_for_sampling
from dream.train import TrainConfig, Trainer


def small_config(tmp_path, **changes):
    config = dict(run_dir=str(tmp_path / "run"), preset="tiny", model_overrides={"image_size": 16, "dropout": 0.0},
                  objective="standard", data_count=256, batch_size=16, epochs=100, max_steps=60, lr=1e-3,
                  ema_decay=0.9, log_every=1, checkpoint_every=0, sample_every=0, device="cpu", progress=False)
    config.update(changes)
    return TrainConfig(**config)


def test_short_run_lowers_the_loss_and_checkpoint_reproduces_outputs(tmp_path):
    torch.set_num_threads(2)
    trainer = Trainer(small_config(tmp_path))
    result = trainer.run()
    assert result["step"] == 60
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 60
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.6 * first, (first, last)

    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([10, 700])
    for use_ema in (False, True):
        model, diffusion, state = load_model_for_sampling(tmp_path / "run" / "checkpoints", use_ema=use_ema)
        assert state["step"] == 60
        trainer.model.eval()
        if use_ema:
            with trainer.ema.applied(trainer.model):
                expected = trainer.model(x, t)
        else:
            expected = trainer.model(x, t)
        assert torch.equal(model(x, t), expected)
