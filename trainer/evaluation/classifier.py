"""Class accuracy of generated images: does a sample show the class it was asked for?

FID says whether samples look like the data; it does not say whether a class-conditional generator
follows its labels. A classifier trained on the real training images does: the fraction of samples
it assigns to their label is the class accuracy (chance = 1 / classes). The classifier is a small
CNN, trained once per dataset in seconds on the bundled dataset (inputs are brought to at most
64 px, so it stays cheap at 256 px), its held-out accuracy on the validation split measured and
stored with it: a sample's class accuracy is only as good as the judge's own, so both are reported.
Like the FID Inception it judges images, not latents: one judge for every tokenizer and DiT trained
on the dataset. The file is safetensors with its settings as metadata; nothing in it can run code.
"""
from __future__ import annotations

import json
import logging
import time

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torchvision.transforms.v2 import functional as TF

from data import sequential_batches, to_model_range
from data.files import atomic_output
from models.weights import UnreadableWeightsError, read_checkpoint

log = logging.getLogger(__name__)

FORMAT = "rectok-class-judge-1"
MAX_INPUT = 64  # inputs are resized to at most this many pixels a side


class ClassJudge(nn.Module):
    """Three stages of two 3x3 convolutions (BatchNorm, ReLU), max-pooling between, global average pooling
    and a linear layer; images in [-1, 1], any size (resized to at most MAX_INPUT)."""

    def __init__(self, num_classes: int, width: int = 32):
        super().__init__()
        layers, cin = [], 3
        for i, cout in enumerate((width, 2 * width, 4 * width)):
            if i:
                layers.append(nn.MaxPool2d(2))
            for _ in range(2):
                layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
                cin = cout
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)
        self.num_classes, self.width = num_classes, width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if max(x.shape[-2:]) > MAX_INPUT:
            x = F.interpolate(x, size=(MAX_INPUT, MAX_INPUT), mode="bilinear", antialias=True, align_corners=False)
        return self.head(self.features(x).mean((2, 3)))

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
        """Predicted classes of images in [-1, 1] (any float dtype), in eval mode."""
        self.eval()
        p = next(self.parameters())
        return torch.cat([self(images[i:i + batch].to(p.device, p.dtype)).argmax(1).cpu()
                          for i in range(0, len(images), batch)])


def class_accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> dict:
    """The fraction of samples assigned to their label, overall and per class."""
    labels, right = labels.cpu(), (predicted.cpu() == labels.cpu()).float()
    per_class = {int(k): right[labels == k].mean().item() for k in labels.unique()}
    return {"class_accuracy": right.mean().item(), "per_class": per_class, "samples": len(labels)}


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Mirror half the batch, shift each image by up to 1/8 of its side (reflected borders), blur it
    (sigma up to 1/16 of its side) and scale its contrast and saturation by up to 25%: the judge is to
    tell the class of a soft or slightly off-colour image (a tokenizer's reconstruction, a sample), not
    its sharpness, which FID measures. Hue is left alone: it is part of a class of the default dataset."""
    b, _, h, w = x.shape
    flip = torch.rand(b, generator=g) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1).to(x.device), x.flip(-1), x)
    pad = max(1, h // 8)
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy, dx = torch.randint(0, 2 * pad + 1, (2, b), generator=g).tolist()
    x = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])
    sigma = torch.rand(b, generator=g) * h / 16
    x = torch.stack([TF.gaussian_blur(img, [2 * pad + 1] * 2, [float(s)] * 2) if s > 0.2 else img
                     for img, s in zip(x, sigma)])
    contrast, saturation = (1 + (torch.rand(2, b, 1, 1, 1, generator=g) - 0.5) / 2).to(x.device)
    mean = x.mean((1, 2, 3), keepdim=True)
    x = (x - mean) * contrast + mean
    grey = x.mean(1, keepdim=True)
    return ((x - grey) * saturation + grey).clamp(-1, 1)


def _evaluate(model: ClassJudge, source, device: torch.device, batch: int, num_workers) -> float:
    n, right = len(source), 0
    for images, labels, _ in source.batches(sequential_batches(range(n), batch), num_workers):
        right += (model.predict(to_model_range(images, device)) == labels.cpu()).sum().item()
    return right / n


def train_judge(train, val, num_classes: int, device: torch.device, epochs: int = 8, batch: int = 128,
                lr: float = 3e-3, seed: int = 0, num_workers=0) -> tuple[ClassJudge, dict]:
    """A ClassJudge trained on the `train` source (AdamW, cosine schedule, mirror and shift augmentation),
    with its accuracy on `val`."""
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = ClassJudge(num_classes).to(device)
    steps_per_epoch = -(-len(train) // batch)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * steps_per_epoch, pct_start=0.15)
    for _ in range(epochs):
        order = torch.randperm(len(train), generator=g).tolist()
        model.train()
        for images, labels, _ in train.batches(sequential_batches(order, batch), num_workers):
            x = _augment(to_model_range(images, device), g)
            loss = F.cross_entropy(model(x), labels.to(device).long())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    info = {"format": FORMAT, "num_classes": num_classes, "width": model.width, "epochs": epochs,
            "train_images": len(train), "train_accuracy": _evaluate(model, train, device, 256, num_workers),
            "val_images": len(val), "held_out_accuracy": _evaluate(model, val, device, 256, num_workers),
            "train": getattr(train, "path", None), "val": getattr(val, "path", None),
            "seconds": round(time.perf_counter() - t0, 1)}
    log.info("class judge: held-out accuracy %.3f on %d images (train %.3f), %d classes, %.0f s",
             info["held_out_accuracy"], len(val), info["train_accuracy"], num_classes, info["seconds"])
    return model.eval(), info


def save_judge(path: str, model: ClassJudge, info: dict) -> str:
    """Written whole or not at all: a crash leaves no half file for the next run to load."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_output(path) as tmp:
        save_file(state, tmp, metadata={"info": json.dumps(info)})
    return path


def load_judge(path: str, device: torch.device | str = "cpu") -> tuple[ClassJudge, dict]:
    """A saved ClassJudge and its info (held-out accuracy, classes, the data it was trained on)."""
    what = "class judge (eval.classifier)"
    state = read_checkpoint(path, what)  # names a missing or damaged file
    with safe_open(path, "pt") as f:
        info = json.loads((f.metadata() or {}).get("info", "{}"))
    if info.get("format") != FORMAT:
        raise UnreadableWeightsError(f"{what}: {path} is not a class judge written by rectok (format "
                                     f"{info.get('format')!r}); delete it to train one")
    model = ClassJudge(info["num_classes"], info["width"])
    model.load_state_dict(state)
    return model.to(device).eval().requires_grad_(False), info
