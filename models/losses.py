"""Tokenizer losses (docs/reference.md §1.9): perceptual (LPIPS-VGG16 + ConvNeXt-S logits), semantic cosine,
PatchGAN."""
from __future__ import annotations

import logging
import warnings
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from .teachers import IMAGENET_MEAN, IMAGENET_STD
from .weights import RANDOM, load_state_dict_file, require_weights

# Prefix of the profiler labels around each network's forward (a trace's time per network; no cost unless
# a profiler runs): trainer/workflows/profile_steps.py sums them.
NETWORK = "net/"

log = logging.getLogger(__name__)


def _frozen(module: nn.Module) -> nn.Module:
    module.requires_grad_(False)
    return module.eval()


class _VGG16FeaturesOnly:
    """Stands in for `torchvision.models` inside lpips while it builds its backbone.

    lpips keeps only `vgg16().features`; torchvision would also initialise the 102M-parameter classifier,
    about 2.5 s of a 2-core CPU each time a tokenizer is built, for weights that are thrown away."""

    @staticmethod
    def vgg16(pretrained: bool = False):
        from torchvision.models.vgg import cfgs, make_layers
        assert not pretrained, "the VGG16 backbone is loaded from a local file, never downloaded"
        features = make_layers(cfgs["D"])
        for m in features.modules():  # torchvision's VGG initialisation of the convolutions
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.constant_(m.bias, 0)
        return SimpleNamespace(features=features)


def _build_lpips_vgg(vgg_weights: str) -> nn.Module:
    import lpips
    import lpips.pretrained_networks as backbones
    torchvision_models, backbones.tv = backbones.tv, _VGG16FeaturesOnly
    try:
        with warnings.catch_warnings():
            # Built on the meta device (FLOP counting) the packaged heads cannot be copied in: harmless.
            warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter", category=UserWarning)
            # pnet_rand: the VGG16 backbone is loaded below from a local file, never downloaded; the
            # LPIPS linear heads ship inside the lpips package.
            net = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
    finally:
        backbones.tv = torchvision_models
    if vgg_weights == RANDOM:
        log.warning("LPIPS VGG16 backbone is randomly initialised: for tests only")
        return net
    sd = load_state_dict_file(vgg_weights, "LPIPS VGG16 backbone (torchvision vgg16)")
    own = net.net.state_dict()  # keys slice{k}.{features index}.{weight,bias}
    mapped = {}
    for key in own:
        _, idx, kind = key.split(".")
        src = f"features.{idx}.{kind}"
        if src not in sd:
            raise KeyError(f"{vgg_weights} is not a torchvision VGG16 state dict: {src} is missing")
        mapped[key] = sd[src]
    net.net.load_state_dict(mapped)
    return net


def _build_convnext_small(weights: str) -> nn.Module:
    import torchvision
    net = torchvision.models.convnext_small(weights=None)
    if weights == RANDOM:
        log.warning("ConvNeXt-S is randomly initialised: for tests only")
    else:
        net.load_state_dict(load_state_dict_file(weights, "ConvNeXt-S (torchvision convnext_small)"))
    return net


class PerceptualLoss(nn.Module):
    """(LPIPS_vgg + w * MSE(ConvNeXt-S logits)) / (1 + w), w = 0.1, on images in [0, 1].

    In fp32 by default. `autocast_dtype` (bf16 on CUDA) runs the two frozen networks under autocast, and
    `channels_last` stores their convolution weights and inputs NHWC, the layout cuDNN's bf16 kernels
    want: about 170 of the tokenizer's 630 GFLOP per image are here. Resizing, normalisation, the LPIPS
    distance and the MSE stay fp32 (autocast keeps interpolate, mse_loss and layer norms in fp32).
    """

    def __init__(self, vgg_weights: str | None, convnext_weights: str | None, convnext_weight: float = 0.1,
                 convnext_size: int = 224, autocast_dtype: torch.dtype | None = None, channels_last: bool = False):
        super().__init__()
        self.lpips = _frozen(_build_lpips_vgg(require_weights(vgg_weights, "LPIPS", "loss.lpips_vgg_weights")))
        self.convnext_weight, self.convnext_size = convnext_weight, convnext_size
        self.convnext = None
        if convnext_weight > 0:
            self.convnext = _frozen(_build_convnext_small(
                require_weights(convnext_weights, "ConvNeXt-S", "loss.convnext_weights")))
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.autocast_dtype = autocast_dtype
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            self.to(memory_format=torch.channels_last)  # kept by a later .to(device)

    def train(self, mode: bool = True):
        return super().train(False)  # frozen networks stay in eval mode

    def _logits(self, x01: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x01, size=self.convnext_size, mode="bilinear", antialias=True, align_corners=False)
        return self.convnext(((x - self.mean) / self.std).contiguous(memory_format=self.memory_format))

    def forward(self, fake01: torch.Tensor, real01: torch.Tensor) -> torch.Tensor:
        fake01, real01 = (x.contiguous(memory_format=self.memory_format) for x in (fake01, real01))
        dtype = self.autocast_dtype
        with torch.autocast(fake01.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            with record_function(f"{NETWORK}lpips"):
                loss = self.lpips(fake01, real01, normalize=True).float().mean()
            if self.convnext is None:
                return loss
            with record_function(f"{NETWORK}convnext"):
                with torch.no_grad():
                    target = self._logits(real01)
                mse = F.mse_loss(self._logits(fake01).float(), target.float())
        return (loss + self.convnext_weight * mse) / (1 + self.convnext_weight)


def semantic_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over batch and tokens of 1 - cos(pred, target) along the feature dim."""
    return (1 - F.cosine_similarity(pred.float(), target.float(), dim=-1)).mean()


class PatchGAN(nn.Module):
    """NLayerDiscriminator: ndf 64, 3 layers, BatchNorm, LeakyReLU 0.2; k4 s2 p1 x3 then k4 s1 p1 x2."""

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=False),
                       nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())


def generator_adv_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.mean()
