"""DiT^DH on RecTok latents: statistics, the latent cache, rectified-flow training, sampling, the CLI."""
import json
import os

import numpy as np
import pytest
import torch

from data import load_batch, to_model_range
from models.noising import dimension_shift
from trainer.cli import main
from trainer.config.recipes import load_config
from trainer.config.tree import ConfigError
from trainer.tasks.dit import DiTTask
from trainer.tasks.latents import (
    MANIFEST,
    ForeignCacheError,
    FrozenTokenizer,
    LatentCache,
    load_or_compute_stats,
    write_latent_cache,
)
from trainer.tasks.sampling import Guidance, euler_sample, image_noise, time_grid, train_time
from trainer.tasks.training import build_trainer, train


def dit_overrides(tmp_path, dataset_dir, tokenizer_run, *extra):
    return [f"run.output_dir={tmp_path}", "run.name=dit", f"dit.tokenizer={tokenizer_run}",
            f"dit.cache_dir={tmp_path / 'cache'}", f"dit.stats={tmp_path / 'stats.json'}",
            "model.latent_channels=8", "model.patch_size=8", f"data.default_dataset_dir={dataset_dir}",
            "data.default_per_class=16", "data.global_batch=16", "logging.progress=false", "logging.log_every=5",
            "eval.num_images=32", "eval.grid_images=4", "sample.steps=4", "checkpoint.every_steps=0", *extra]


def images_of(cfg):
    from trainer.tasks.splits import open_split
    return open_split(cfg, "train")


def images_at(source, ids):
    return to_model_range(load_batch(source, ids)[0], torch.device("cpu"))


@pytest.mark.quick
def test_time_grid_and_training_times():
    s = dimension_shift(256, 128)
    assert s == pytest.approx(2.83, abs=5e-3)
    g = time_grid(150, s)
    assert len(g) == 150 and g[0] == 0 and g[-1] == 1
    assert g[1].item() == pytest.approx(0.00238, abs=5e-6) and g[2].item() == pytest.approx(0.00479, abs=5e-6)
    assert g[-2].item() == pytest.approx(0.9812, abs=5e-5)
    assert torch.all(g[1:] > g[:-1])
    t = train_time(100_000, s, generator=torch.Generator().manual_seed(0))
    assert 0 <= t.min() and t.max() <= 1
    assert t.mean() < 0.35  # shifted towards the noise end (t = 0): E[t] = 0.29 at s = 2.83
    assert time_grid(5, 1.0).tolist() == pytest.approx([0, 0.25, 0.5, 0.75, 1.0])


def random_dit(seed=0):
    from models import build_model
    torch.manual_seed(seed)
    m = build_model("DiTDH-T", latent_channels=8, grid=4, num_classes=10).eval()
    for p in m.parameters():  # leave the zero init so the output depends on every input
        if p.requires_grad and not p.abs().sum():
            torch.nn.init.normal_(p, std=0.05)
    return m


@pytest.mark.quick
def test_guidance_limits_and_interval():
    model, bad = random_dit(0), random_dit(1)
    x, y = torch.randn(3, 8, 4, 4), torch.tensor([1, 2, 3])
    cond = model(x, torch.full((3,), 0.4), y)
    uncond = model(x, torch.full((3,), 0.4), torch.full_like(y, 10))
    assert not torch.allclose(cond, uncond)
    torch.testing.assert_close(Guidance("cfg", 1.0).velocity(model, x, 0.4, y), cond, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(Guidance("cfg", 0.0).velocity(model, x, 0.4, y), uncond, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(Guidance("cfg", 3.0).velocity(model, x, 0.4, y), uncond + 3 * (cond - uncond),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(Guidance("autoguidance", 1.0, guide=bad).velocity(model, x, 0.4, y), cond,
                               atol=1e-5, rtol=1e-5)
    v_bad = bad(x, torch.full((3,), 0.4), y)
    torch.testing.assert_close(Guidance("autoguidance", 2.0, guide=bad).velocity(model, x, 0.4, y),
                               v_bad + 2 * (cond - v_bad), atol=1e-5, rtol=1e-5)
    outside = Guidance("cfg", 3.0, interval=(0.5, 1.0)).velocity(model, x, 0.4, y)
    torch.testing.assert_close(outside, cond, atol=1e-6, rtol=1e-6)


@pytest.mark.quick
def test_sampling_is_deterministic_under_a_seed_and_independent_of_batching():
    model = random_dit()
    y = torch.tensor([0, 1, 2, 3])
    noise = image_noise(range(4), (8, 4, 4), seed=7)
    assert torch.equal(noise, image_noise(range(4), (8, 4, 4), seed=7))
    assert torch.equal(noise[2:], image_noise([2, 3], (8, 4, 4), seed=7))
    assert not torch.equal(noise, image_noise(range(4), (8, 4, 4), seed=8))
    g = Guidance("cfg", 2.0)
    a = euler_sample(model, noise, y, 6, 2.0, g)
    assert torch.equal(a, euler_sample(model, noise, y, 6, 2.0, g))
    torch.testing.assert_close(a[2:], euler_sample(model, noise[2:], y[2:], 6, 2.0, g), atol=1e-5, rtol=1e-5)
    # a zero-initialised model has v = 0: sampling returns the noise unchanged
    from models import build_model
    fresh = build_model("DiTDH-T", latent_channels=8, grid=4, num_classes=10)
    assert torch.equal(euler_sample(fresh, noise, y, 6, 2.0, g), noise)


def test_latent_stats_computed_once_and_tied_to_the_tokenizer(tmp_path, dataset_dir, tokenizer_run):
    cfg = load_config("dit/tiny_dit", dit_overrides(tmp_path, dataset_dir, tokenizer_run))
    tok, images = FrozenTokenizer(tokenizer_run), images_of(cfg)
    path = str(tmp_path / "stats.json")
    stats = load_or_compute_stats(path, tok, images, 64, torch.device("cpu"))
    means = torch.cat([tok.moments(images_at(images, range(j, min(j + 40, len(images)))))[0]
                       for j in range(0, len(images), 40)])
    torch.testing.assert_close(stats.mean.flatten(), means.mean((0, 2, 3)), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(stats.std.flatten(), means.transpose(0, 1).flatten(1).std(1, unbiased=False),
                               atol=1e-5, rtol=1e-4)
    z = means[:5]
    torch.testing.assert_close(stats.denormalize(stats.normalize(z)), z, atol=1e-5, rtol=1e-5)
    with open(path) as f:
        saved = json.load(f)
    assert saved["tokenizer_hash"] == tok.hash and saved["images"] == len(images)
    os.utime(path, (0, 0))
    load_or_compute_stats(path, tok, images, 64, torch.device("cpu"))
    assert os.path.getmtime(path) == 0  # read, not recomputed
    saved["tokenizer_hash"] = "0" * 64
    with open(path, "w") as f:
        json.dump(saved, f)
    with pytest.raises(ForeignCacheError, match="another tokenizer"):
        load_or_compute_stats(path, tok, images, 64, torch.device("cpu"))


def test_cache_round_trips_resumes_and_refuses_a_foreign_tokenizer(tmp_path, dataset_dir, tokenizer_run):
    cfg = load_config("dit/tiny_dit", dit_overrides(tmp_path, dataset_dir, tokenizer_run))
    tok, images = FrozenTokenizer(tokenizer_run), images_of(cfg)
    cache_dir, cpu = str(tmp_path / "cache"), torch.device("cpu")
    out = write_latent_cache(tok, images, cache_dir, 48, 32, cpu)
    assert out == {"cache_dir": cache_dir, "shards_written": 4, "shards_reused": 0, "complete": True, "count": 160}
    cache = LatentCache(cache_dir, tok.hash)
    assert len(cache) == 160
    for i in (0, 47, 48, 159):
        moments, label, index = cache[i]
        assert moments.dtype == torch.bfloat16 and moments.shape == (2, 2, 8, 4, 4)
        assert label == images.labels[i] and index == i
        x = images_at(images, [i])
        for flip, img in ((0, x), (1, x.flip(-1))):
            mean, logvar = tok.moments(img)
            torch.testing.assert_close(moments[flip, 0].float(), mean[0], atol=2e-2, rtol=1e-2)  # bf16 error
            torch.testing.assert_close(moments[flip, 1].float(), logvar[0], atol=2e-2, rtol=1e-2)
    # an interrupted run: one shard missing, manifest not yet complete -> only that shard is redone
    manifest_path = os.path.join(cache_dir, MANIFEST)
    with open(manifest_path) as f:
        manifest = json.load(f)
    with open(manifest_path, "w") as f:
        json.dump({**manifest, "complete": False}, f)
    os.remove(os.path.join(cache_dir, manifest["shards"][2]["file"]))
    with pytest.raises(FileNotFoundError, match="incomplete"):
        LatentCache(cache_dir)
    kept = {s["file"]: os.stat(os.path.join(cache_dir, s["file"])).st_mtime_ns for s in manifest["shards"][:2]}
    out = write_latent_cache(tok, images, cache_dir, 48, 32, cpu)
    assert (out["shards_written"], out["shards_reused"], out["complete"]) == (1, 3, True)
    assert all(os.stat(os.path.join(cache_dir, f)).st_mtime_ns == t for f, t in kept.items())
    assert torch.equal(LatentCache(cache_dir)[100][0], cache[100][0])
    # another tokenizer (same shapes, other weights) is refused, for writing and for reading
    other = FrozenTokenizer(tokenizer_run, use_ema=False)
    assert other.hash != tok.hash
    with pytest.raises(ForeignCacheError, match="another tokenizer"):
        write_latent_cache(other, images, cache_dir, 48, 32, cpu)
    with pytest.raises(ForeignCacheError, match="not by the configured one"):
        LatentCache(cache_dir, other.hash)
    stray = str(tmp_path / "cache2")
    write_latent_cache(tok, images, stray, 80, 32, cpu)
    os.remove(os.path.join(stray, MANIFEST))
    with pytest.raises(ForeignCacheError, match="shards of another tokenizer"):
        write_latent_cache(other, images, stray, 80, 32, cpu)


def test_online_encoding_matches_the_cache(tmp_path, dataset_dir, tokenizer_run):
    over = dit_overrides(tmp_path, dataset_dir, tokenizer_run)
    cached = load_config("dit/tiny_dit", over)
    main(["cache-latents", "dit/tiny_dit", *over])
    cache_task = DiTTask(cached, torch.device("cpu"))
    online_task = DiTTask(load_config("dit/tiny_dit", over + ["dit.latents=online"]), torch.device("cpu"))
    ids = [3, 50, 120]
    m, x = load_batch(cache_task.train_set, ids)[0], load_batch(online_task.train_set, ids)[0]
    flip = torch.tensor([False, True, True])
    for a, b in zip(cache_task.moments(m, flip), online_task.moments(x, flip)):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=1e-2)
    # the drawn samples are normalised posterior samples: mean ~ normalised posterior mean
    z, y = cache_task.prepare(m.repeat(400, 1, 1, 1, 1, 1), torch.tensor(ids).repeat(400))
    mean, _ = cache_task.moments(m, torch.zeros(3, dtype=torch.bool))
    mean_f, _ = cache_task.moments(m, torch.ones(3, dtype=torch.bool))
    zbar = z.view(400, 3, *z.shape[1:]).mean(0)
    expect = 0.5 * (cache_task.stats.normalize(mean) + cache_task.stats.normalize(mean_f))  # flips are 50/50
    assert (zbar - expect).abs().mean() < 0.15 * z.std()


def test_tiny_dit_loss_falls_on_cached_latents_and_samples(tmp_path, dataset_dir, tokenizer_run):
    over = dit_overrides(tmp_path, dataset_dir, tokenizer_run, "schedule.epochs=8", "schedule.decay_start_epoch=6",
                         "schedule.decay_end_epoch=8", "optim.base_lr=1e-2", "ema.decay=0.9", "eval.at_start=true",
                         "eval.every_epochs=0")
    with pytest.raises(FileNotFoundError, match="rectok cache-latents"):
        train(load_config("dit/tiny_dit", over))
    assert main(["cache-latents", "dit/tiny_dit", *over]) == 0
    r = train(load_config("dit/tiny_dit", over))
    assert r["eval/loss_ema"] < 0.8 * r["at_start"]["eval/loss_ema"], (r["at_start"], r)
    assert os.path.isfile(r["eval/grid"])
    out = tmp_path / "samples"
    args = ["sample", r["run_dir"], "--out", str(out), "--num-images", "3", "sample.guidance=cfg", "sample.scale=2"]
    assert main(args) == 0
    first = np.load(out / "samples.npz")
    assert first["arr_0"].shape == (3, 32, 32, 3) and first["arr_0"].dtype == np.uint8
    assert first["labels"].tolist() == [0, 1, 2] and os.path.isfile(out / "000002.png")
    assert os.path.isfile(out / "sample_config.yaml")
    assert main(args) == 0
    assert np.array_equal(np.load(out / "samples.npz")["arr_0"], first["arr_0"])  # fixed seed, same images
    ag = ["sample", r["run_dir"], "--out", str(tmp_path / "ag"), "--labels", "4,5", "sample.guidance=autoguidance",
          f"sample.guide={r['run_dir']}", "sample.scale=1.5"]
    assert main(ag) == 0 and np.load(tmp_path / "ag" / "samples.npz")["labels"].tolist() == [4, 5]


@pytest.mark.quick
def test_dit_recipes_and_config_errors(tmp_path):
    xl = load_config("dit/ditdh_xl")
    assert xl.task == "dit" and xl.model.name == "DiTDH-XL" and xl.ema.decay == 0.9995
    assert xl.optim.base_lr * xl.data.global_batch / 256 == pytest.approx(2e-4)
    assert (xl.schedule.kind, xl.schedule.warmup_epochs, xl.schedule.decay_start_epoch,
            xl.schedule.decay_end_epoch, xl.schedule.min_lr) == ("constant_linear", 0, 40, 800, 2e-5)
    assert (xl.optim.weight_decay, xl.optim.grad_clip, xl.dit.label_drop, xl.schedule.epochs) == (0, 1.0, 0.1, 600)
    assert load_config("dit/ditdh_xl_80ep").schedule.epochs == 80
    guide = load_config("dit/ditdh_s_guide_30ep")
    assert (guide.model.name, guide.schedule.epochs) == ("DiTDH-S", 30)
    for s in "sblx":
        name = {"x": "xl"}.get(s, s)
        assert load_config(f"dit/ditdh_{name}").model.name == f"DiTDH-{name.upper()}"
    with pytest.raises(ConfigError, match="model.name"):
        load_config("dit/ditdh_xl", ["model.name=RecTok-BB"])
    with pytest.raises(ConfigError, match="dit.tokenizer"):
        load_config("dit/ditdh_xl", ["dit.tokenizer=null"])
    with pytest.raises(ConfigError, match="null class was never trained"):
        load_config("dit/ditdh_xl", ["dit.label_drop=0", "sample.guidance=cfg"])
    with pytest.raises(ConfigError, match="sample.guide"):
        load_config("dit/ditdh_xl", ["sample.guidance=autoguidance"])
    with pytest.raises(ConfigError, match="sample.interval"):
        load_config("dit/ditdh_xl", ["sample.interval=[0.8,0.2]"])
    assert main(["train", "dit/ditdh_xl", f"dit.tokenizer={tmp_path}/missing"]) == 2


def test_dit_resume_continues_exactly(tmp_path, dataset_dir, tokenizer_run):
    over = dit_overrides(tmp_path, dataset_dir, tokenizer_run, "schedule.epochs=2", "schedule.decay_start_epoch=1",
                         "schedule.decay_end_epoch=2", "checkpoint.every_steps=7", "checkpoint.keep_last=5",
                         "eval.every_epochs=0")
    main(["cache-latents", "dit/tiny_dit", *over])
    full = build_trainer(load_config("dit/tiny_dit", over + ["run.name=full"]))
    full.fit()
    build_trainer(load_config("dit/tiny_dit", over + ["run.name=part", "run.max_steps=7"])).fit()
    resumed = build_trainer(load_config("dit/tiny_dit", over + ["run.name=part"]))
    assert resumed.step == 7
    resumed.fit()
    assert resumed.step == full.step == 20
    for (k, a), b in zip(full.strategy.ema.state_dict().items(), resumed.strategy.ema.state_dict().values()):
        assert torch.equal(a, b), k


def test_labels_beyond_dit_num_classes_are_refused_when_the_data_opens(tmp_path, dataset_dir, tokenizer_run,
                                                                        capsys):
    """The default dataset has 10 classes (labels 0..9). With dit.num_classes=9, label 9 was the null class
    and trained silently (exit 0); with 5 the run failed mid-training with an IndexError (exit 1)."""
    over = dit_overrides(tmp_path, dataset_dir, tokenizer_run, "run.max_steps=2", "eval.every_epochs=0")
    for n in (9, 5):  # online encoding: refused before the tokenizer loads
        assert main(["train", "dit/tiny_dit", *over, "dit.latents=online", f"dit.num_classes={n}"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"dit.num_classes: {n}, but the largest label of" in err[0], err
        assert "is 9, 10 classes recorded: set dit.num_classes=10" in err[0] and ".beton" in err[0]
        assert not os.path.exists(tmp_path / "stats.json")  # nothing computed before the refusal
    assert main(["cache-latents", "dit/tiny_dit", *over]) == 0
    with pytest.raises(ConfigError, match=r"dit.num_classes: 9, but the largest label of .*cache \(latents of "
                                          r".*train.beton\) is 9: set dit.num_classes=10"):
        DiTTask(load_config("dit/tiny_dit", over + ["dit.num_classes=9"]), torch.device("cpu"))
    assert len(DiTTask(load_config("dit/tiny_dit", over), torch.device("cpu")).train_set) == 160
