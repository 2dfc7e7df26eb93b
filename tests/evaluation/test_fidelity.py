"""FID, IS and precision/recall against torch-fidelity's own functions (which ours call) and independent
float64 computations (scipy, closed forms), sFID's spatial features, reference statistics files, and the
Inception extractor with random weights of the real shape (its weights cannot be downloaded here)."""
import os

import numpy as np
import pytest
import torch
from scipy import linalg

from data import default_split
from models.weights import MissingWeightsError
from trainer.evaluation.fidelity import (
    SPATIAL_DIMS,
    Inception,
    fid,
    frechet_distance,
    inception_score,
    load_spatial_stats,
    load_stats,
    precision_recall,
    save_stats,
    sharded_inception,
    statistics,
)
from trainer.tasks.sampling import balanced_labels


def feature_sets(n=600, d=64, seed=0):
    g = np.random.default_rng(seed)
    a = g.normal(size=(n, d)) @ g.normal(size=(d, d)) * 0.3
    b = g.normal(size=(n, d)) @ g.normal(size=(d, d)) * 0.3 + 0.5
    return a, b


@pytest.mark.quick
def test_fid_equals_torch_fidelity_and_scipy():
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    a, b = feature_sets()
    ours = fid(a, b)
    theirs = fid_statistics_to_metric(fid_features_to_statistics(torch.from_numpy(a)),
                                      fid_features_to_statistics(torch.from_numpy(b)),
                                      verbose=False)["frechet_inception_distance"]
    (mu1, s1), (mu2, s2) = statistics(a), statistics(b)
    covmean = linalg.sqrtm(s1 @ s2)
    independent = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)
    assert ours > 1
    assert ours == pytest.approx(theirs, rel=1e-12) and abs(ours - independent) / independent < 1e-6
    assert abs(fid(a, a)) < 1e-6 * np.trace(s1)  # identical sets: 0 within rounding


@pytest.mark.quick
def test_inception_score_uniform_is_one_and_matches_torch_fidelity():
    from torch_fidelity.metric_isc import isc_features_to_metric
    assert inception_score(torch.zeros(100, 1008)) == (1.0, 0.0)
    logits = torch.randn(1003, 1008, generator=torch.Generator().manual_seed(0)) * 3
    theirs = isc_features_to_metric(logits, splits=10, shuffle=False)
    mean, std = inception_score(logits, splits=10)
    assert mean == pytest.approx(theirs["inception_score_mean"], rel=1e-9) and mean > 1.5
    assert std == pytest.approx(theirs["inception_score_std"], rel=1e-6)
    one_hot = torch.full((1000, 1000), -1e4).fill_diagonal_(0)  # confident, every class once
    assert inception_score(one_hot, splits=1)[0] == pytest.approx(1000, rel=1e-6)


@pytest.mark.quick
def test_precision_recall_of_a_set_with_itself_is_one_and_matches_torch_fidelity():
    from torch_fidelity.metric_prc import calculate_precision_recall_full
    a, b = feature_sets(300, 16)
    assert precision_recall(a, a) == (1.0, 1.0)
    p, r = precision_recall(a, b, batch=64)  # real a, fake b
    tp, tr = calculate_precision_recall_full(torch.from_numpy(b), torch.from_numpy(a))  # (generated, real)
    assert (p, r) == pytest.approx((tp, tr), abs=1e-6) and 0 <= p < 1
    # independently: a point is covered when within some other set's point's distance to its 3rd neighbour
    real, fake = torch.from_numpy(a), torch.from_numpy(b)
    radius = {id(x): torch.cdist(x, x).sort(1).values[:, 3] for x in (real, fake)}
    covered = {id(x): (torch.cdist(x, y) <= radius[id(y)][None]).any(1).double().mean().item()
               for x, y in ((fake, real), (real, fake))}
    assert (p, r) == pytest.approx((covered[id(fake)], covered[id(real)]), abs=1e-6)


@pytest.mark.quick
def test_balanced_labels_give_50_per_class():
    assert torch.equal(torch.bincount(balanced_labels(50_000, 1000)), torch.full((1000,), 50))


@pytest.mark.quick
def test_reference_statistics_round_trip_and_clear_errors(tmp_path):
    a, _ = feature_sets(100, 8)
    mu, sigma = statistics(a)
    path = save_stats(str(tmp_path / "ref.npz"), mu, sigma, count=100)
    got_mu, got_sigma = load_stats(path)
    assert np.array_equal(got_mu, mu) and np.array_equal(got_sigma, sigma)
    assert frechet_distance(got_mu, got_sigma, mu, sigma) == pytest.approx(0, abs=1e-9)
    with pytest.raises(FileNotFoundError, match="rectok eval ref-stats"):
        load_stats(str(tmp_path / "missing.npz"))
    np.savez(tmp_path / "adm_samples.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="no 'mu' and 'sigma' arrays \\(has arr_0\\)"):
        load_stats(str(tmp_path / "adm_samples.npz"))
    np.savez(tmp_path / "bad.npz", mu=mu, sigma=sigma[:3])
    with pytest.raises(ValueError, match="do not fit together"):
        load_stats(str(tmp_path / "bad.npz"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable .npz"):
        load_stats(str(tmp_path / "junk.npz"))


@pytest.mark.quick
def test_spatial_statistics_in_reference_files(tmp_path):
    """mu_s / sigma_s (sFID, ADM's key names) beside mu / sigma; a file written before sFID still loads."""
    a, _ = feature_sets(50, 8)
    mu, sigma = statistics(a)
    mu_s, sigma_s = statistics(np.random.default_rng(1).normal(size=(20, SPATIAL_DIMS)))
    path = save_stats(str(tmp_path / "ref.npz"), mu, sigma, mu_s, sigma_s, count=50)
    with np.load(path) as f:
        assert set(f.files) == {"mu", "sigma", "mu_s", "sigma_s", "count"}
    got = load_spatial_stats(path)
    assert np.array_equal(got[0], mu_s) and np.array_equal(got[1], sigma_s) and sigma_s.shape == (2023, 2023)
    assert np.array_equal(load_stats(path)[1], sigma)
    old = save_stats(str(tmp_path / "old.npz"), mu, sigma)  # written before sFID: FID as before, no sFID
    assert load_spatial_stats(old) is None and np.array_equal(load_stats(old)[1], sigma)
    np.savez(tmp_path / "half.npz", mu=mu, sigma=sigma, mu_s=mu_s)
    with pytest.raises(ValueError, match="no 'mu_s' and 'sigma_s' arrays"):
        load_spatial_stats(str(tmp_path / "half.npz"))
    np.savez(tmp_path / "pool.npz", mu=mu, sigma=sigma, mu_s=mu, sigma_s=sigma)
    with pytest.raises(ValueError, match="sFID's spatial features 2023"):
        load_spatial_stats(str(tmp_path / "pool.npz"))


@pytest.mark.quick
def test_inception_features_from_local_weights_only(tmp_path):
    net = Inception("random")
    seen, calls = {}, []
    net.net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: seen.update(out=o.clone()))
    net.net.register_forward_hook(lambda m, i, o: calls.append(1))
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    features, logits, spatial = net.extract(images)
    assert features.shape == (3, 2048) and logits.shape == (3, 1008) and features.dtype == torch.float64
    # sFID's features (ADM: mixed_6/conv, first 7 channels, flattened h, w, c) from Mixed_6d.branch1x1, in the
    # one pass that gives the pool features
    assert len(calls) == 1 and spatial.shape == (3, SPATIAL_DIMS) == (3, 2023) and seen["out"].shape == (3, 192, 17, 17)
    assert torch.equal(spatial.view(3, 17, 17, 7), seen["out"][:, :7].permute(0, 2, 3, 1))
    one = net(images[:1])  # (features, logits), per image whatever the batch
    assert len(one) == 2 and torch.equal(one[0], features[:1])
    assert torch.allclose(one[1], logits[:1], rtol=0, atol=1e-4 * logits.abs().max().item())  # fc rounds by batch
    weights = tmp_path / "inception.pt"
    torch.save(net.net.state_dict(), weights)
    assert torch.equal(Inception(str(weights))(images)[0], features)
    with pytest.raises(MissingWeightsError, match="eval.inception_weights.*nowhere.pt"):
        Inception(str(tmp_path / "nowhere.pt"))
    torch.save({"fc.weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a torch-fidelity Inception-v3 state dict"):
        Inception(str(tmp_path / "other.pt"))
    with pytest.raises(TypeError, match="uint8"):
        net(images.float())


@pytest.mark.distributed
def test_ref_stats_and_generator_evaluation_end_to_end(tmp_path, dataset_dir, tokenizer_run, capsys):
    """A tiny DiT checkpoint: `rectok eval ref-stats` on the validation images, then `rectok eval generator`
    with 20 balanced samples. Its gFID equals the FID of the same samples written by `rectok sample`
    (same seed) featurised here, so the pipeline (truncation, Inception, statistics) is the documented one."""
    import json
    import os

    from trainer.cli import main
    from trainer.config.recipes import load_config
    from trainer.tasks.training import train
    over = [f"run.output_dir={tmp_path}", "run.name=dit", f"dit.tokenizer={tokenizer_run}",
            f"dit.cache_dir={tmp_path / 'cache'}", f"dit.stats={tmp_path / 'stats.json'}", "model.latent_channels=8",
            "model.patch_size=8", f"data.default_dataset_dir={dataset_dir}", "data.default_per_class=16",
            "data.global_batch=16", "logging.progress=false", "eval.num_images=16", "eval.grid_images=2",
            "sample.steps=2", "checkpoint.every_steps=0", "run.max_steps=2", "eval.every_epochs=0"]
    val = default_split(dataset_dir, "val", "ffcv", 32, 16)
    ref = tmp_path / "ref.npz"
    assert main(["eval", "ref-stats", "--data", val, "--out", str(ref), "--size", "32",
                 "--inception-weights", "random", "--batch-size", "16"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 40
    assert main(["cache-latents", "dit/tiny_dit", *over]) == 0
    # Training tracks gFID-8 of its EMA samples at each evaluation: the same number `eval generator` gives.
    tracked = train(load_config("dit/tiny_dit", [*over, "eval.fid_images=8", f"eval.reference={ref}",
                                                 "eval.inception_weights=random"]))
    run = tracked["run_dir"]
    from trainer.workflows.evaluate import evaluate_generator
    same = evaluate_generator(run, [f"eval.reference={ref}", "eval.inception_weights=random"], 8, progress=False)
    assert tracked["eval/gfid8"] == pytest.approx(same["gfid"], rel=1e-6)
    # the tiny recipe's class judge (trained before the first step, beside the training split) scores samples
    assert 0 <= tracked["eval/class_accuracy"] <= 1 and 0 <= same["class_accuracy"] <= 1
    assert same["class_judge"]["path"].endswith(".class_judge_32px.safetensors")
    with np.load(ref) as f:
        assert f["mu"].shape == (2048,) and f["sigma"].shape == (2048, 2048) and f["features"].shape == (40, 2048)
        assert f["mu_s"].shape == (2023,) and f["sigma_s"].shape == (2023, 2023)  # sFID, ADM's key names
    settings = [f"eval.reference={ref}", "eval.inception_weights=random", "sample.guidance=cfg", "sample.scale=1.5"]
    with pytest.raises(FileNotFoundError, match="rectok eval ref-stats"):
        evaluate_generator(run, [f"eval.reference={tmp_path / 'none.npz'}", "eval.inception_weights=random"], 20)
    assert main(["eval", "generator", run, *settings, "--num-images", "20", "--out", str(tmp_path / "ev")]) == 0
    result = json.loads((tmp_path / "ev" / "eval_generator.json").read_text())
    assert result["num_images"] == 20 and result["inception_score"] >= 1 and 0 <= result["precision"] <= 1
    assert np.isfinite(result["sfid"]) and result["sfid"] > 0 and "note" not in result
    assert result["sampler"]["steps"] == 2 and result["sampler"]["guidance"] == "cfg"
    assert result["sampler"]["scale"] == 1.5 and result["weights"] == "ema"
    assert main(["sample", run, "--out", str(tmp_path / "s"), "--num-images", "20", *settings[2:]]) == 0
    samples = torch.from_numpy(np.load(tmp_path / "s" / "samples.npz")["arr_0"]).permute(0, 3, 1, 2)
    features, _, spatial = Inception("random").extract(samples)
    assert result["gfid"] == pytest.approx(frechet_distance(*statistics(features), *load_stats(str(ref))), rel=1e-9)
    assert result["sfid"] == pytest.approx(frechet_distance(*statistics(spatial), *load_spatial_stats(str(ref))),
                                           rel=1e-6)
    # ADM's reference files hold images (arr_0) rather than features: precision/recall from those.
    with np.load(ref) as f:
        np.savez(tmp_path / "adm.npz", mu=f["mu"], sigma=f["sigma"], arr_0=samples.permute(0, 2, 3, 1).numpy())
    again = evaluate_generator(run, [f"eval.reference={tmp_path / 'adm.npz'}", *settings[1:]], 20, progress=False)
    assert again["precision"] == 1.0 and again["recall"] == 1.0  # the reference images are these samples
    assert again["sfid"] is None and "sFID not computed" in again["note"]  # no mu_s / sigma_s in that file
    assert again["gfid"] == pytest.approx(result["gfid"], rel=1e-9)
    # The same evaluation on two ranks (torchrun, gloo): each samples its half, features gathered in order.
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "trainer.cli", "eval", "generator", run, *settings, "--num-images", "20",
                           "--out", str(tmp_path / "ev2")], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    two = json.loads((tmp_path / "ev2" / "eval_generator.json").read_text())
    assert two["ranks"] == 2 and two["gfid"] == pytest.approx(result["gfid"], rel=1e-6)
    assert two["inception_score"] == pytest.approx(result["inception_score"], rel=1e-6)
    assert two["sfid"] == pytest.approx(result["sfid"], rel=1e-4) and np.isfinite(two["sfid"])
    assert two["class_accuracy"] == result["class_accuracy"] and len(result["class_accuracy_per_class"]) == 10


def test_tokenizer_evaluation_rfid_and_psnr(tmp_path, dataset_dir, tokenizer_run, micro):
    import json
    import os

    from data import evenly_spaced, load_batch, to_model_range
    from trainer.cli import main
    from trainer.engine.checkpoint import saved_config
    from trainer.evaluation.fidelity import save_stats
    from trainer.evaluation.images import psnr
    from trainer.tasks.latents import FrozenTokenizer
    from trainer.tasks.splits import open_split
    val = open_split(saved_config(tokenizer_run, [], task="tokenizer"), "val")
    images = load_batch(val, evenly_spaced(len(val), 12))[0]  # 12 of 40 over all classes, not the first 12 (3 classes)
    net = Inception("random")
    ref = save_stats(str(tmp_path / "val.npz"), *statistics(net(images)[0]))
    assert main(["eval", "tokenizer", tokenizer_run, f"eval.reference={ref}", "eval.inception_weights=random",
                 "--out", str(tmp_path), "--batch-size", "8", "--num-images", "12"]) == 0
    result = json.loads((tmp_path / "eval_tokenizer.json").read_text())
    assert result["num_images"] == 12 and len(val) == 40
    assert result["rsfid_raw"] is None and "rsFID not computed" in result["note"]  # the file has no mu_s / sigma_s
    x = to_model_range(images, torch.device("cpu"))
    for kind in ("raw", "ema"):
        tok = FrozenTokenizer(tokenizer_run, use_ema=kind == "ema")
        rec = tok.decode(tok.moments(x)[0])
        assert result[f"psnr_{kind}"] == pytest.approx(psnr(rec * 0.5 + 0.5, x * 0.5 + 0.5).double().mean().item(),
                                                      rel=1e-6)
        from trainer.evaluation.images import to_uint8_images
        expected = frechet_distance(*statistics(net(to_uint8_images(rec))[0]), *load_stats(ref))
        assert result[f"rfid_{kind}"] == pytest.approx(expected, rel=1e-6) and expected > 0
    assert os.path.isfile(tmp_path / "eval_tokenizer.json")
    # Training tracks rFID of its EMA reconstructions; a missing reference fails before training.
    from trainer.config.recipes import load_config
    from trainer.tasks.training import train
    from trainer.workflows.evaluate import evaluate_tokenizer
    fid = ["eval.fid_images=12", f"eval.reference={ref}", "eval.inception_weights=random", "run.max_steps=2"]
    with pytest.raises(FileNotFoundError, match="eval.reference: FID reference statistics not found"):
        train(load_config("rectok/tiny_stage1", [*micro, *fid[:3], "eval.reference=nowhere.npz"]))
    tracked = train(load_config("rectok/tiny_stage1", [*micro, *fid]))
    same = evaluate_tokenizer(tracked["run_dir"], fid[1:3], 12, progress=False)
    assert tracked["eval/rfid12"] == pytest.approx(same["rfid_ema"], rel=1e-6)


@pytest.mark.quick
def test_featurising_resumes_after_an_interruption_where_it_stopped(tmp_path):
    """A 50K-sample evaluation preempted midway: the requeued job featurises only what is left, and the
    features, logits, spatial features and the caller's state equal those of one uninterrupted pass."""
    net = Inception("random")
    images = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    whole = sharded_inception(10, 2, lambda ids: images[ids], net, spatial=True)
    resume, judged = str(tmp_path / "featurised"), {}

    def preempted_after_three(ids):
        if len(judged) == 6:
            raise RuntimeError("preempted")
        judged.update({i: i % 3 for i in ids})
        return images[ids]

    with pytest.raises(RuntimeError, match="preempted"):
        sharded_inception(10, 2, preempted_after_three, net, spatial=True, resume=resume, state={"judged": judged},
                          save_every_s=0)
    assert os.path.isfile(resume + ".rank0of1.pt")
    again, asked = {}, []
    out = sharded_inception(10, 2, lambda ids: asked.append(ids) or images[ids], net, spatial=True, resume=resume,
                            state={"judged": again}, save_every_s=0)
    assert asked == [[6, 7], [8, 9]] and again == {i: i % 3 for i in range(6)}
    assert all(torch.equal(a, b) for a, b in zip(out, whole)) and not os.path.exists(resume + ".rank0of1.pt")
    judged.clear()
    with pytest.raises(RuntimeError, match="preempted"):
        sharded_inception(10, 2, preempted_after_three, net, resume=resume, save_every_s=0)
    asked.clear()  # a file written for other settings (another batch size) is not used
    sharded_inception(10, 5, lambda ids: asked.append(ids) or images[ids], net, resume=resume, save_every_s=0)
    assert asked == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
