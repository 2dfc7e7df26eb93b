"""FID, sFID, Inception Score and precision/recall (docs/reference.md §4): torch-fidelity's FID-compatible
Inception-v3 for the features and torch-fidelity's own functions for the arithmetic.

Features are the 2048-d pool features and the 1008-way unbiased logits of torch-fidelity's
`inception-v3-compat` network, read from a local weights file (`pt_inception-2015-12-05` converted
to PyTorch; nothing is downloaded), and the 2023-d spatial features of ADM's sFID from the same forward
pass. Statistics are float64 and stored as ADM's reference files are: an .npz with `mu` [2048] and
`sigma` [2048, 2048] (and `mu_s` [2023], `sigma_s` [2023, 2023] for sFID), so the ADM ImageNet-256 file
compares directly.

Under torchrun each rank featurises a contiguous share of the images (every one exactly once) and the
features are gathered in index order, so the numbers do not depend on the number of ranks.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time

import numpy as np
import torch
from tqdm import tqdm

from data import eval_batches
from data.files import atomic_output
from models.weights import RANDOM, load_state_dict_file, read_checkpoint, require_weights, weights_only_loading
from trainer.config.schema import TrainConfig
from trainer.engine.distributed import gather_rows, rank_and_world
from trainer.engine.tracking import bar_disabled

log = logging.getLogger("rectok")

FEATURES, LOGITS = "2048", "logits_unbiased"
SPATIAL_CHANNELS = 7  # ADM keeps the first 7 of the 192 channels of mixed_6/conv: 17 * 17 * 7 = 2023 features
SPATIAL_DIMS = 17 * 17 * SPATIAL_CHANNELS


class Inception:
    """uint8 images [B, 3, H, W] (any size: resized to 299 as TF-Inception does) -> features, logits
    (`net(images)`), or features, logits and sFID's spatial features (`net.extract(images)`)."""

    def __init__(self, weights: str, device: torch.device | str = "cpu"):
        # Imported where used: training and `rectok profile` must run where torch-fidelity is not installed
        # (the GPU benchmark machines), and only FID needs it.
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        require_weights(weights, "Inception-v3 (FID)", "eval.inception_weights")
        # Read here, not by torch-fidelity, which unpickles its file with weights_only=False.
        state = None if weights == RANDOM else load_state_dict_file(weights,
                                                                    "Inception-v3 (FID) (eval.inception_weights)")

        class _Extractor(FeatureExtractorInceptionV3):
            def load_state_dict(self, state_dict, strict=True, assign=False):
                if state_dict is None:  # the constructor's own load (of the file below): nothing to load yet
                    return None
                return super().load_state_dict(state_dict, strict, assign)

        fd, nothing = tempfile.mkstemp(suffix=".pt")  # torch-fidelity always loads a file: give it one holding None
        os.close(fd)
        try:
            torch.save(None, nothing)
            # Seeded (the caller's generator untouched): weights=random is the same network in every process.
            with weights_only_loading("Inception-v3 (FID)"), torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                net = _Extractor("inception-v3-compat", [FEATURES, LOGITS], feature_extractor_weights_path=nothing)
        finally:
            os.unlink(nothing)
        if state is not None:  # weights=random keeps the initialisation (tests only)
            try:
                if not isinstance(state, dict):
                    raise TypeError(f"the file holds a {type(state).__name__}")
                net.load_state_dict(state)
            except (RuntimeError, KeyError, TypeError) as e:
                raise ValueError(f"eval.inception_weights: {weights} is not a torch-fidelity Inception-v3 "
                                 f"state dict ({str(e).splitlines()[0]})") from None
        # sFID's spatial features (ADM's evaluations/evaluator.py: FID_SPATIAL_NAME = "mixed_6/conv:0", then
        # `spatial[..., :7]`, flattened per image). In the 2015-12-05 TF graph `mixed_6` is the fourth 17x17
        # block (mixed_3 = Mixed_6a, mixed_4 = 6b, mixed_5 = 6c, mixed_6 = 6d) and `mixed_6/conv` is its 1x1
        # branch after batch norm and ReLU: torch-fidelity's weight converter (utils/
        # util_convert_inception_weights.py) maps "mixed_6/conv/{conv2d_params,batchnorm}" to
        # Mixed_6d.branch1x1.{conv,bn}, and BasicConv2d returns relu(bn(conv(x))), the tensor ADM reads.
        # TF is NHWC, torch NCHW: the first 7 channels are moved last before flattening, so the 2023 values
        # come in ADM's (h, w, c) order and ADM's `mu_s` / `sigma_s` compare directly. Known difference:
        # this is torch-fidelity's port of the TF graph (same weights, TF-compatible bilinear resize and
        # pooling; torch-fidelity checks its port on the pool features and FID), so the values can differ from
        # TF's by convolution rounding, not bit for bit; this tensor was not compared with TF's here. A hook
        # reads it during the pass that gives the pool features: Inception runs once.
        net.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)
        self._spatial = None
        self.net = net.to(device)
        self.device = torch.device(device)

    def _keep_spatial(self, module, inputs, output):
        self._spatial = output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(len(output), -1)

    @torch.no_grad()
    def extract(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pool features [B, 2048] float64, logits [B, 1008] float64, spatial features [B, 2023] float32:
        the network's own precision, half the memory of 50K float64 rows) from one forward pass."""
        if images.dtype != torch.uint8:
            raise TypeError("Inception features take uint8 images (quantised by truncation, docs/reference.md §4)")
        self._spatial = None
        features, logits = self.net(images.to(self.device))
        spatial, self._spatial = self._spatial, None
        return features.double().cpu(), logits.double().cpu(), spatial.float().cpu()

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.extract(images)[:2]


def statistics(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) in float64; sigma with the unbiased (N - 1) normalisation (numpy's cov, as torch-fidelity's
    fid_features_to_statistics and ADM's evaluator)."""
    from torch_fidelity.metric_fid import fid_features_to_statistics
    f = torch.as_tensor(np.asarray(features, dtype=np.float64))
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"statistics need at least 2 feature vectors, got shape {tuple(f.shape)}")
    stats = fid_features_to_statistics(f)
    return stats["mu"], stats["sigma"]


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)) in float64, by torch-fidelity's
    fid_statistics_to_metric (the square root's trace from the eigenvalues of S1 S2, their tiny negative or
    imaginary rounding parts dropped; ADM's evaluator takes scipy's sqrtm: the same number to rounding)."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics of different sizes: {mu1.shape} vs {mu2.shape}")
    return fid_statistics_to_metric({"mu": mu1, "sigma": sigma1}, {"mu": mu2, "sigma": sigma2},
                                    verbose=False)[KEY_METRIC_FID]


def fid(features_1, features_2) -> float:
    return frechet_distance(*statistics(features_1), *statistics(features_2))


def inception_score(logits: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) over `splits` contiguous splits: (mean, std), by torch-fidelity's
    isc_features_to_metric in float64 with shuffle=False (its default shuffles): samples are not shuffled,
    their order is the label order, and 10 contiguous splits of 50K are ADM's splits of 5000."""
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
    out = isc_features_to_metric(torch.as_tensor(logits, dtype=torch.float64), splits=splits, shuffle=False)
    return out[KEY_METRIC_ISC_MEAN], out[KEY_METRIC_ISC_STD]


def precision_recall(real, fake, k: int = 3, batch: int = 10000) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019, k = 3 as ADM's evaluator) by torch-fidelity's
    prc_features_to_metric (its memory-saving path, `batch` rows of distances at a time): precision = share
    of fake samples inside the real manifold (balls to each real sample's k-th neighbour), recall = share of
    real samples inside the fake manifold. torch-fidelity averages the 0/1 hits in float32."""
    from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric
    real, fake = torch.as_tensor(real, dtype=torch.float64), torch.as_tensor(fake, dtype=torch.float64)
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k = {k} need more than {k} samples per set")
    # torch-fidelity's convention: features_1 generated, features_2 real
    out = prc_features_to_metric(fake, real, prc_neighborhood=k, prc_batch_size=batch, save_cpu_ram=True,
                                 verbose=False)
    return out[KEY_METRIC_PRECISION], out[KEY_METRIC_RECALL]


def save_stats(path: str, mu: np.ndarray, sigma: np.ndarray, mu_s: np.ndarray | None = None,
               sigma_s: np.ndarray | None = None, **info) -> str:
    """ADM's reference layout (mu, sigma; mu_s, sigma_s of the spatial features for sFID when given), written
    to a temporary file and renamed when complete."""
    spatial = {} if mu_s is None else {"mu_s": mu_s, "sigma_s": sigma_s}
    with atomic_output(path, suffix=".npz") as tmp:  # np.savez appends .npz to a name without it
        np.savez(tmp, mu=mu, sigma=sigma, **spatial, **{k: np.asarray(v) for k, v in info.items()})
    return path


def _read_pair(path: str, names: tuple[str, str], required: bool) -> tuple[np.ndarray, np.ndarray] | None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"reference statistics not found: {path} (rectok eval ref-stats writes them)")
    try:
        with np.load(path) as f:
            arrays = {k: f[k] for k in names if k in f.files}
            files = f.files
    except (OSError, EOFError, ValueError) as e:  # numpy reads a non-zip file as a pickle and refuses it
        raise ValueError(f"{path}: not a readable .npz ({e})") from None
    if len(arrays) != 2:
        if not required and not arrays:
            return None
        raise ValueError(f"{path}: no '{names[0]}' and '{names[1]}' arrays (has {', '.join(files) or 'nothing'}); "
                         f"reference statistics are ADM's .npz layout")
    mu, sigma = arrays[names[0]].astype(np.float64), arrays[names[1]].astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise ValueError(f"{path}: {names[0]} {mu.shape} and {names[1]} {sigma.shape} do not fit together")
    return mu, sigma


def load_stats(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of a reference .npz (ours or ADM's VIRTUAL_imagenet256_labeled.npz)."""
    return _read_pair(path, ("mu", "sigma"), required=True)


def load_spatial_stats(path: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(mu_s, sigma_s) of sFID's spatial features in a reference .npz (ADM's files and those `rectok eval
    ref-stats` writes hold them), or None for a file without them (written before sFID)."""
    stats = _read_pair(path, ("mu_s", "sigma_s"), required=False)
    if stats is not None and len(stats[0]) != SPATIAL_DIMS:
        raise ValueError(f"{path}: mu_s has {len(stats[0])} values, sFID's spatial features {SPATIAL_DIMS}")
    return stats


def reference_features(path: str, net: Inception, batch: int = 100) -> np.ndarray | None:
    """Features for precision / recall: ours are stored; ADM's files hold images (`arr_0`) instead."""
    with np.load(path) as f:
        if "features" in f.files:
            return f["features"]
        if "arr_0" in f.files and f["arr_0"].ndim == 4:
            images = torch.from_numpy(f["arr_0"]).permute(0, 3, 1, 2).contiguous()
            return torch.cat([net(images[s:s + batch])[0] for s in range(0, len(images), batch)]).numpy()
    return None


def sharded_inception(n: int, batch: int, images_for, net: Inception, progress: bool = False,
                      desc: str = "inception", spatial: bool = False, resume: str | None = None,
                      state: dict | None = None, save_every_s: float = 60.0) -> tuple[torch.Tensor, ...]:
    """Inception (features, logits) of images 0..n-1, `images_for(ids)` giving uint8 images, and their
    spatial features (sFID) third with `spatial=True`. Each rank takes its contiguous share; shorter shares
    repeat their last id so every rank makes the same number of calls (sharded models need every rank in
    every forward); repeats are dropped before gathering.

    `resume`: a path prefix naming what is featurised (the caller's settings in it): every rank keeps what
    it has done in RESUME.rank<r>of<w>.pt, written whole every `save_every_s` seconds, and a rerun (a
    requeued job after a preemption) starts after it; the files go once the features are gathered.
    `state`: the caller's own picklable dict of plain values (a judge's predictions), kept in the same file
    and merged back on resume."""
    rank, world = rank_and_world()
    mine = eval_batches(n, batch, rank, world)
    real = len(mine)
    calls = max(len(eval_batches(n, batch, r, world)) for r in range(world))
    mine += [[mine[-1][-1] if mine else 0]] * (calls - real)
    parts = ([], [], []) if spatial else ([], [])
    path = f"{resume}.rank{rank}of{world}.pt" if resume else None
    start = _resume_featurised(path, {"n": n, "batch": batch, "world": world, "spatial": spatial}, parts, state)
    saved_at = time.monotonic()
    for i in tqdm(range(start, len(mine)), desc=desc, disable=bar_disabled(progress), dynamic_ncols=True,
                  initial=start, total=len(mine)):
        for part, x in zip(parts, net.extract(images_for(mine[i]))):
            part.append(x if i < real else x[:0])
        if path and time.monotonic() - saved_at >= save_every_s and i + 1 < len(mine):
            _save_featurised(path, {"n": n, "batch": batch, "world": world, "spatial": spatial}, i + 1, parts, state)
            saved_at = time.monotonic()
    out = tuple(gather_rows(torch.cat(part)) for part in parts)
    if path and os.path.exists(path):
        os.unlink(path)
    return out


def _save_featurised(path: str, key: dict, done: int, parts, state: dict | None) -> None:
    with atomic_output(path) as tmp:
        torch.save({"key": key, "done": done, "parts": [torch.cat(p) for p in parts], "state": state or {}}, tmp)


def _resume_featurised(path: str | None, key: dict, parts, state: dict | None) -> int:
    """Batches already featurised by this rank (their outputs appended to `parts`, `state` merged); 0 with
    no file or one written for other settings."""
    if not path or not os.path.isfile(path):
        return 0
    saved = read_checkpoint(path, "featurised images (evaluation resume)")
    if saved.get("key") != key:
        log.warning("%s was written for other settings (%s, now %s): featurising from the start", path,
                    saved.get("key"), key)
        return 0
    for part, x in zip(parts, saved["parts"]):
        part.append(x)
    for k, v in saved["state"].items():
        if state is not None and isinstance(state.get(k), dict):
            state[k].update(v)
        elif state is not None:
            state[k] = v
    log.info("%s: resuming after %d featurised batches", path, saved["done"])
    return saved["done"]


class TrackedFID:
    """The FID a training run tracks at each evaluation (eval.fid_images images): Inception and the
    reference are loaded at the first use and kept."""

    def __init__(self, cfg: TrainConfig, device: torch.device):
        self.cfg, self.device, self.net, self.ref = cfg, device, None, None

    def __call__(self, n: int, images_for, batch: int) -> float:
        if self.net is None:
            self.ref = load_stats(self.cfg.eval.reference)
            self.net = Inception(self.cfg.eval.inception_weights, self.device)
        features, _ = sharded_inception(n, batch, images_for, self.net)
        return frechet_distance(*statistics(features), *self.ref)
