"""FID, Inception Score and precision/recall (docs/reference.md §4), from torch-fidelity's FID-compatible
Inception-v3.

Features are the 2048-d pool features and the 1008-way unbiased logits of torch-fidelity's
`inception-v3-compat` network, read from a local weights file (`pt_inception-2015-12-05` converted
to PyTorch; nothing is downloaded). Statistics are float64 and stored as ADM's reference files are:
an .npz with `mu` [2048] and `sigma` [2048, 2048], so the ADM ImageNet-256 file compares directly.

Under torchrun each rank featurises a contiguous share of the images (every one exactly once) and the
features are gathered in index order, so the numbers do not depend on the number of ranks.
"""
from __future__ import annotations

import os
import tempfile

import numpy as np
import torch
from tqdm import tqdm

from data import eval_batches
from data.files import atomic_output
from models.weights import RANDOM, load_state_dict_file, require_weights, weights_only_loading
from trainer.config.schema import TrainConfig
from trainer.engine.distributed import gather_rows, rank_and_world
from trainer.engine.tracking import bar_disabled

FEATURES, LOGITS = "2048", "logits_unbiased"


class Inception:
    """uint8 images [B, 3, H, W] (any size: resized to 299 as TF-Inception does) -> features, logits."""

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
            with weights_only_loading("Inception-v3 (FID)"):
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
        self.net = net.to(device)
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.dtype != torch.uint8:
            raise TypeError("Inception features take uint8 images (quantised by truncation, docs/reference.md §4)")
        features, logits = self.net(images.to(self.device))
        return features.double().cpu(), logits.double().cpu()


def statistics(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) in float64; sigma with the unbiased (N - 1) normalisation, as numpy's cov."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"statistics need at least 2 feature vectors, got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)), in float64.

    tr((S1 S2)^(1/2)) is the sum of the square roots of the eigenvalues of S1 S2, which are real and
    non-negative for covariance matrices; rounding leaves tiny negative or imaginary parts, dropped
    by taking the real part of the complex square root (torch-fidelity does the same)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics of different sizes: {mu1.shape} vs {mu2.shape}")
    diff = mu1 - mu2
    eig = np.linalg.eigvals(sigma1 @ sigma2)
    tr_covmean = np.sqrt(eig.astype(np.complex128)).real.sum()
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def fid(features_1, features_2) -> float:
    return frechet_distance(*statistics(features_1), *statistics(features_2))


def inception_score(logits: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) over `splits` contiguous splits: (mean, std) as in the IS paper (the
    split boundaries i*N//splits of torch-fidelity; samples are not shuffled, their order is the label order)."""
    logits = torch.as_tensor(logits, dtype=torch.float64)
    p, log_p = logits.softmax(1), logits.log_softmax(1)
    n, scores = len(logits), []
    for i in range(splits):
        part, log_part = p[i * n // splits:(i + 1) * n // splits], log_p[i * n // splits:(i + 1) * n // splits]
        kl = (part * (log_part - part.mean(0, keepdim=True).log())).sum(1).mean()
        scores.append(torch.exp(kl).item())
    return float(np.mean(scores)), float(np.std(scores))


def _kth_neighbour_radius(x: torch.Tensor, k: int, batch: int) -> torch.Tensor:
    """Distance from each row of x to its k-th nearest other row."""
    out = []
    for s in range(0, len(x), batch):
        d = torch.cdist(x[s:s + batch], x)
        out.append(d.kthvalue(k + 1, dim=1).values)  # the (k+1)-th smallest includes the row itself (0)
    return torch.cat(out)


def _covered(x: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, batch: int) -> torch.Tensor:
    """Whether each row of x lies inside some ball (centre, radius)."""
    out = []
    for s in range(0, len(x), batch):
        out.append((torch.cdist(x[s:s + batch], centres) <= radii[None]).any(1))
    return torch.cat(out)


def precision_recall(real, fake, k: int = 3, batch: int = 10000) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019, k = 3 as ADM's evaluator): precision =
    share of fake samples inside the real manifold (balls to each real sample's k-th neighbour), recall
    = share of real samples inside the fake manifold."""
    real, fake = torch.as_tensor(real, dtype=torch.float64), torch.as_tensor(fake, dtype=torch.float64)
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k = {k} need more than {k} samples per set")
    precision = _covered(fake, real, _kth_neighbour_radius(real, k, batch), batch).double().mean().item()
    recall = _covered(real, fake, _kth_neighbour_radius(fake, k, batch), batch).double().mean().item()
    return precision, recall


def save_stats(path: str, mu: np.ndarray, sigma: np.ndarray, **info) -> str:
    """ADM's reference layout (mu, sigma), written to a temporary file and renamed when complete."""
    with atomic_output(path, suffix=".npz") as tmp:  # np.savez appends .npz to a name without it
        np.savez(tmp, mu=mu, sigma=sigma, **{k: np.asarray(v) for k, v in info.items()})
    return path


def load_stats(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of a reference .npz (ours or ADM's VIRTUAL_imagenet256_labeled.npz)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"reference statistics not found: {path} (rectok eval ref-stats writes them)")
    try:
        with np.load(path) as f:
            arrays = {k: f[k] for k in ("mu", "sigma") if k in f.files}
            names = f.files
    except (OSError, EOFError, ValueError) as e:  # numpy reads a non-zip file as a pickle and refuses it
        raise ValueError(f"{path}: not a readable .npz ({e})") from None
    if len(arrays) != 2:
        raise ValueError(f"{path}: no 'mu' and 'sigma' arrays (has {', '.join(names) or 'nothing'}); reference "
                         f"statistics are ADM's .npz layout")
    mu, sigma = arrays["mu"].astype(np.float64), arrays["sigma"].astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} do not fit together")
    return mu, sigma


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
                      desc: str = "inception") -> tuple[torch.Tensor, torch.Tensor]:
    """Inception (features, logits) of images 0..n-1, `images_for(ids)` giving uint8 images. Each rank
    takes its contiguous share; shorter shares repeat their last id so every rank makes the same number
    of calls (sharded models need every rank in every forward); repeats are dropped before gathering."""
    rank, world = rank_and_world()
    mine = eval_batches(n, batch, rank, world)
    real = len(mine)
    calls = max(len(eval_batches(n, batch, r, world)) for r in range(world))
    mine += [[mine[-1][-1] if mine else 0]] * (calls - real)
    features, logits = [], []
    for i, ids in enumerate(tqdm(mine, desc=desc, disable=bar_disabled(progress), dynamic_ncols=True)):
        f, lg = net(images_for(ids))
        features.append(f if i < real else f[:0])
        logits.append(lg if i < real else lg[:0])
    return gather_rows(torch.cat(features)), gather_rows(torch.cat(logits))


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
