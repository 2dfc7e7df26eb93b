"""End-to-end tiny runs on CPU: stage 1, stage 2 from its checkpoint, exact resume, clear failures."""
import json
import os
import shutil

import pytest
import torch

from models.weights import MissingWeightsError
from trainer.cli import main
from trainer.config.recipes import load_config
from trainer.config.tree import ConfigError
from trainer.engine.checkpoint import list_complete
from trainer.engine.loop import NonFiniteLossError
from trainer.engine.tracking import read_metrics
from trainer.parallel.consolidate import load_state
from trainer.tasks.training import build_trainer, train


def test_stage1_loss_falls_then_stage2_from_its_checkpoint(micro):
    s1 = train(load_config("rectok/tiny_stage1", micro + [
        "run.name=s1", "schedule.epochs=3", "optim.base_lr=2e-2", "loss.disc_start_epoch=2",
        "logging.peak_tflops=0.5"]))
    rows = [r for r in read_metrics(s1["run_dir"]) if "total" in r]
    assert len(rows) == 60
    first, last = sum(r["total"] for r in rows[:5]) / 5, sum(r["total"] for r in rows[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    assert {"rec", "perceptual", "kl", "semantic", "lr", "grad_norm/generator", "img_per_s"} <= set(rows[-1])
    assert "gan_g" in rows[-1] and "gan_d" in rows[-1] and "gan_g" not in rows[10]  # D starts at epoch 2
    assert "grad_norm/discriminator" in rows[-1]
    last = rows[-1]  # throughput: per device, against the configured peak, the step split, memory
    assert last["img_per_s_per_device"] == last["img_per_s"] > 0 and last["mem/peak_gb"] > 0
    assert last["mfu"] == pytest.approx(last["tflops_per_device"] / 0.5)
    phases = sum(last[f"time/{p}_ms"] for p in ("data", "fwd_bwd", "sync", "optim", "ema"))
    assert 0.5 * last["time/step_ms"] < phases <= 1.01 * last["time/step_ms"]
    assert os.path.isfile(s1["eval/grid"]) and s1["eval/psnr_ema"] > 0
    saved = yaml_config(s1["run_dir"])
    assert saved["model"]["latent_channels"] == 8 and saved["run"]["name"] == "s1"

    state1 = load_state(s1["run_dir"])
    tr = build_trainer(load_config("rectok/tiny_stage2", micro + [
        "run.name=s2", f"tokenizer.init_from={s1['run_dir']}", "optim.base_lr=2e-2"]))
    model = tr.task.model
    assert tr.task.teacher is None and model.semantic_decoder is None
    torch.testing.assert_close(model.encoder.latent_head.weight, state1["ema"]["encoder.latent_head.weight"])
    assert not any(p.requires_grad for p in model.encoder.parameters())
    assert all(p.requires_grad for p in model.decoder.parameters())
    assert tr.task.trained_modules[1].start_step == 0  # fresh discriminator from epoch 0
    enc_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    dec_before = model.decoder.ffn.weight.detach().clone()
    s2 = tr.fit()
    for k, v in model.encoder.state_dict().items():
        assert torch.equal(v, enc_before[k]), k
    assert not torch.equal(model.decoder.ffn.weight, dec_before)
    rows2 = [r for r in read_metrics(s2["run_dir"]) if "total" in r]
    assert "semantic" not in rows2[0] and "kl" not in rows2[0] and "kept_frac" not in rows2[0]
    assert "gan_g" in rows2[0]


def yaml_config(run_dir):
    import yaml
    with open(os.path.join(run_dir, "config.yaml")) as f:
        return yaml.safe_load(f)


def test_resume_continues_from_saved_step_exactly(micro):
    over = micro + ["schedule.epochs=2", "run.max_steps=30", "checkpoint.every_steps=5", "loss.disc_start_epoch=1",
                    "checkpoint.keep_last=10", "eval.every_epochs=0", "run.name=run"]
    full = build_trainer(load_config("rectok/tiny_stage1", over))
    full.fit()
    want = [{k: v.clone() for k, v in sd.items()} for sd in (
        full.task.model.state_dict(), full.strategy.ema.state_dict(), full.task.disc.state_dict())]
    # The same run interrupted at step 25 (mid-epoch 2, discriminator active): what came after is gone.
    for step, path in list_complete(full.run_dir):
        if step > 25:
            shutil.rmtree(path)
    os.remove(os.path.join(full.run_dir, "done.json"))
    resumed = build_trainer(load_config("rectok/tiny_stage1", over))
    assert resumed.step == 25
    resumed.fit()
    assert resumed.step == 30
    steps = [r["step"] for r in read_metrics(resumed.run_dir) if "total" in r]
    assert steps == list(range(1, 31))  # the redone steps' records replaced, none repeated or skipped
    got = (resumed.task.model.state_dict(), resumed.strategy.ema.state_dict(), resumed.task.disc.state_dict())
    for w, g in zip(want, got):
        for k, v in w.items():
            assert torch.equal(v, g[k]), k


def test_gradient_accumulation_matches_full_batch(micro, monkeypatch):
    # Deterministic forward (posterior mean, no noise, no mask) so one batch of 8 and two of 4 must agree.
    from models.rectok import DiagonalGaussian
    monkeypatch.setattr(DiagonalGaussian, "sample", lambda self: self.mean)
    over = micro + ["run.max_steps=2", "eval.every_epochs=0", "data.hflip=false", "tokenizer.gamma=0",
                    "tokenizer.mask_ratio_max=0.0", "tokenizer.mask_ratio_min=-1", "loss.kl_weight=0"]
    a = build_trainer(load_config("rectok/tiny_stage1", over + ["run.name=a"]))
    b = build_trainer(load_config("rectok/tiny_stage1", over + ["run.name=b", "data.micro_batch=4"]))
    assert b.micro == 4
    a.fit(), b.fit()
    for (k, x), y in zip(a.task.model.state_dict().items(), b.task.model.state_dict().values()):
        torch.testing.assert_close(x, y, atol=2e-5, rtol=1e-4, msg=k)


@pytest.mark.quick
def test_nan_loss_stops_with_step_batch_and_terms(micro, monkeypatch):
    tr = build_trainer(load_config("rectok/tiny_stage1", micro + ["run.name=nan", "eval.every_epochs=0"]))
    real = tr.task.losses

    def poisoned(x, step):  # stands in for a diverged model: the real loss, made NaN at step 3
        losses, terms = real(x, step)
        if step == 3:
            terms["semantic"] = terms["semantic"] * float("nan")
        return losses, terms

    monkeypatch.setattr(tr.task, "losses", poisoned)
    before = {k: v.clone() for k, v in tr.task.model.state_dict().items()}
    with pytest.raises(NonFiniteLossError, match=r"step 3 .*sample ids \[.*semantic=nan"):
        tr.fit()
    assert tr.step == 3  # nothing was stepped through
    assert any(not torch.equal(v, before[k]) for k, v in tr.task.model.state_dict().items())


def test_fused_adamw_skips_a_nan_step_on_the_device_and_reports_it_later(micro, monkeypatch):
    """With torch's fused AdamW the losses stay on the device between log steps (no per-step host sync):
    the NaN step's update and EMA are skipped on the device, and the error still names that step."""
    tr = build_trainer(load_config("rectok/tiny_stage1", micro + [
        "run.name=nan_deferred", "eval.every_epochs=0", "parallel.adamw=fused", "logging.log_every=5",
        "loss.gan_weight=0"]))
    assert tr.deferred
    real = tr.task.losses

    def poisoned(x, step):  # NaN gradients at step 3: a fused step taken on them would make weights NaN
        losses, terms = real(x, step)
        if step == 3:
            losses = {k: v * float("nan") for k, v in losses.items()}
            terms["total"] = losses["generator"]
        return losses, terms

    monkeypatch.setattr(tr.task, "losses", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"step 3 .*sample ids \[.*skipped on the device, found at step 5"):
        tr.fit()
    assert tr.step == 5  # read back at the log step
    model, ema = tr.task.model, tr.strategy.ema.model
    assert all(torch.isfinite(p).all() for p in [*model.parameters(), *ema.parameters()])
    opt = tr.strategy.optimizers["generator"]
    assert {int(s["step"]) for s in opt.state.values()} == {4}  # five steps taken, one skipped


def test_term_signal_saves_a_checkpoint_and_stops_then_the_run_resumes(micro, monkeypatch, capsys):
    """SIGTERM mid-run (scancel, a Slurm preemption, torchrun passing it on): `rectok train` saves a complete
    checkpoint at the next step boundary and stops; running the command again resumes from it. The
    handler is the process's previous one again afterwards."""
    import signal

    from trainer.tasks.tokenizer import TokenizerTask
    real = TokenizerTask.losses

    def signalled(self, x, step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, x, step)

    monkeypatch.setattr(TokenizerTask, "losses", signalled)
    before = signal.getsignal(signal.SIGTERM)
    args = ["train", "rectok/tiny_stage1", *micro, "run.name=term", "eval.every_epochs=0"]

    def printed_result() -> dict:  # the JSON rank 0 prints last, after the log lines
        out = "\n" + capsys.readouterr().out
        return json.loads(out[out.rindex("\n{") + 1:])

    assert main(args) == 0
    result = printed_result()
    assert result["preempted"] and result["signal"] == "SIGTERM" and result["step"] == 4  # the signalled step finishes
    assert [step for step, _ in list_complete(result["run_dir"])] == [4]
    assert signal.getsignal(signal.SIGTERM) is before
    monkeypatch.setattr(TokenizerTask, "losses", real)
    assert main(args) == 0
    result = printed_result()
    assert not result["preempted"] and result["step"] == 20


@pytest.mark.quick
def test_missing_weights_file_fails_before_any_work(micro, tmp_path):
    with pytest.raises(MissingWeightsError, match=r"teacher\.weights.*dinov3_missing\.pth"):
        build_trainer(load_config("rectok/tiny_stage1", micro + [f"teacher.weights={tmp_path}/dinov3_missing.pth"]))
    with pytest.raises(MissingWeightsError, match=r"loss\.lpips_vgg_weights"):
        build_trainer(load_config("rectok/tiny_stage1", micro + ["loss.lpips_vgg_weights=null"]))
    with pytest.raises(MissingWeightsError, match=r"loss\.convnext_weights.*cnx\.pth"):
        build_trainer(load_config("rectok/tiny_stage1",
                                  micro + ["run.name=w", f"loss.convnext_weights={tmp_path}/cnx.pth"]))
    assert not os.path.exists(tmp_path / "w")  # failed before the run directory was made
    # The paper recipes name files that are not on this machine: a clear error, not a download.
    assert main(["train", "rectok/stage1_d128"]) == 2


@pytest.mark.quick
def test_stage2_without_a_stage1_checkpoint_is_clear(micro, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.init_from: no complete checkpoint"):
        build_trainer(load_config("rectok/tiny_stage2", micro + [f"tokenizer.init_from={tmp_path}/nothing"]))


@pytest.mark.quick
def test_missing_dataset_is_clear(micro, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data\.train: dataset not found: .*no_such_imagenet"):
        build_trainer(load_config("rectok/tiny_stage1", micro + [f"data.train={tmp_path}/no_such_imagenet.beton",
                                                           f"data.val={tmp_path}/no_such_imagenet.beton"]))
    with pytest.raises(ConfigError, match="data.train and data.val: set both or neither"):
        build_trainer(load_config("rectok/tiny_stage1", micro + [f"data.train={tmp_path}"]))


@pytest.mark.quick
def test_cli_reports_bad_config_and_info(capsys, micro):
    assert main(["train", "rectok/tiny_stage1", "optim.base_lr=fast"]) == 2
    assert "optim.base_lr" in capsys.readouterr().err
    assert main(["train", "rectok/tiny_stage1", "model.latent_channels=0"]) == 2
    assert "model.latent_channels" in capsys.readouterr().err
    assert main(["info", "RecTok-BB"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params"]["encoder"] == 86_033_920 and info["forward_flops_per_image"]["total"] > 0


@pytest.mark.quick
def test_batch_larger_than_dataset(micro):
    with pytest.raises(ConfigError, match="data.global_batch"):
        build_trainer(load_config("rectok/tiny_stage1", micro + ["data.global_batch=4096"]))


@pytest.mark.quick
def test_bf16_autocast_runs_on_cpu(micro):
    tr = build_trainer(load_config("rectok/tiny_stage1", micro + ["run.name=bf16", "parallel.precision=bf16",
                                                           "run.max_steps=2", "eval.every_epochs=0"]))
    assert tr.task.autocast_dtype == torch.bfloat16
    out = tr.fit()
    assert out["step"] == 2 and out["eval/psnr_raw"] > 0
