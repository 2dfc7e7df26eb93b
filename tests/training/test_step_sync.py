"""The training step reads nothing back between its periodic read-backs (issue 23): a host sync per step
would stall a GPU that runs ahead of Python. With an optimizer that skips a non-finite step on the device
(torch's fused AdamW, which a CPU runs too), no call that copies to or from the host may happen inside
`Trainer.train_step`. A TorchDispatchMode would not see `.tolist()` or `.cpu()` on a CPU, so the Tensor
methods and `torch.tensor` themselves are wrapped while steps run."""
import collections
import os
import traceback

import pytest
import torch

from trainer.config.catalog import REPO_ROOT
from trainer.config.recipes import load_config
from trainer.engine.ema import EMA
from trainer.tasks.training import build_trainer

READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")
# Host-side by design: the RAD mask ratio is drawn from the CPU generator (it fixes K, a shape); no device
# tensor is involved on a GPU either.
HOST_SIDE = {("item", "models/noising.py")}


def _host_reads_per_step(trainer, monkeypatch, steps: int) -> collections.Counter:
    calls, active = collections.Counter(), [False]

    def wrap(owner, name):
        real = getattr(owner, name)

        def counted(*args, **kwargs):
            if active[0] and (name != "tensor" or kwargs.get("device") is not None):
                frame = traceback.extract_stack(limit=2)[0]
                where = os.path.relpath(frame.filename, REPO_ROOT)
                if (name, where) not in HOST_SIDE:
                    calls[f"{name} at {where}:{frame.lineno}"] += 1
            return real(*args, **kwargs)
        monkeypatch.setattr(owner, name, counted)

    for name in READS:
        wrap(torch.Tensor, name)
    wrap(torch, "tensor")
    batches = [list(range(i * trainer.per_rank, (i + 1) * trainer.per_rank)) for i in range(steps)]
    for batch in trainer.timed_batches(batches):
        active[0] = True
        trainer.train_step(*batch)
        active[0] = False
    return calls


@pytest.mark.parametrize("recipe,extra", [
    ("rectok/tiny_stage1", ["loss.disc_start_epoch=0"]),  # generator and discriminator steps, RAD masking
    ("dit/tiny_dit", ["data.synthetic=true", "model.latent_channels=8"]),
], ids=["tokenizer", "dit"])
def test_no_host_sync_inside_a_step(micro, monkeypatch, recipe, extra):
    trainer = build_trainer(load_config(recipe, micro + extra + [
        "run.name=sync", "parallel.adamw=fused", "logging.log_every=100", "eval.every_epochs=0"]))
    assert trainer.deferred  # the losses stay on the device between read-backs
    calls = _host_reads_per_step(trainer, monkeypatch, steps=4)
    monkeypatch.undo()
    assert not calls, f"host reads inside train_step: {dict(calls)}"
    assert trainer.read_metrics()["total"] > 0  # the periodic read-back still reads
    trainer.close()


@pytest.mark.quick
def test_ema_with_a_device_flag_matches_lerp_and_holds_on_a_skipped_step():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    ema, ref = EMA(model, 0.9), EMA(model, 0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    ema.update(model, torch.tensor(True))
    ref.update(model)
    for a, b in zip(ema.model.parameters(), ref.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
    before = [p.clone() for p in ema.model.parameters()]
    ema.update(model, torch.tensor(False))
    assert all(torch.equal(a, b) for a, b in zip(before, ema.model.parameters()))
