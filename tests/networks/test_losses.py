"""Teacher input path, perceptual loss, semantic loss and the PatchGAN (docs/reference.md §1.8-1.9).

LPIPS-VGG16, ConvNeXt-S and the teachers run their real code with random weights: pretrained
weights cannot be downloaded here. Loading from local files is tested with files the test writes.
"""
import pytest
import torch
import torch.nn.functional as F

from models.losses import PatchGAN, PerceptualLoss, generator_adv_loss, hinge_d_loss, semantic_loss
from models.teachers import Teacher
from models.weights import MissingWeightsError


@pytest.mark.quick
def test_teacher_preprocessing_path():
    t = Teacher("dinov3-tiny", "random")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    u8 = ((x * 0.5 + 0.5) * 255).to(torch.uint8).float() / 255  # truncation
    ref = F.interpolate(u8, size=28, mode="bilinear", antialias=True, align_corners=False)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    ref = (ref - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    ref = F.interpolate(ref, size=32, mode="bilinear", align_corners=False)
    torch.testing.assert_close(t.preprocess(x), ref)
    out = t(x)
    assert out.shape == (2, 64, 64)  # patch tokens only: CLS and the 4 registers dropped
    assert not out.requires_grad and not any(p.requires_grad for p in t.parameters())
    t.train()
    assert not t.training


@pytest.mark.quick
def test_teacher_loads_local_file_and_names_missing_one(tmp_path):
    src = Teacher("dinov3-micro", "random")
    path = tmp_path / "teacher.pt"
    torch.save(src.net.state_dict(), path)
    loaded = Teacher("dinov3-micro", str(path))
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(loaded(x), src(x))
    wrong = tmp_path / "not_a_teacher.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, wrong)
    with pytest.raises(RuntimeError, match="not_a_teacher.pt does not match"):
        Teacher("dinov3-micro", str(wrong))
    with pytest.raises(MissingWeightsError, match="no_such_dinov3.pth"):
        Teacher("dinov3-micro", str(tmp_path / "no_such_dinov3.pth"))
    with pytest.raises(MissingWeightsError, match="teacher.weights"):
        Teacher("dinov3-micro", None)


def test_perceptual_loss_mix_and_local_weights(tmp_path):
    import torchvision
    vgg = torchvision.models.vgg16(weights=None)
    torch.save(vgg.state_dict(), tmp_path / "vgg16.pth")
    cnx = torchvision.models.convnext_small(weights=None)
    torch.save(cnx.state_dict(), tmp_path / "convnext_small.pth")
    loss = PerceptualLoss(str(tmp_path / "vgg16.pth"), str(tmp_path / "convnext_small.pth"), convnext_size=32)
    torch.testing.assert_close(loss.lpips.net.slice1[0].weight, vgg.features[0].weight)
    torch.testing.assert_close(getattr(loss.lpips.net.slice5, "28").weight, vgg.features[28].weight)
    a, b = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    lp = loss.lpips(a, b, normalize=True).mean()
    cn = F.mse_loss(loss._logits(a), loss._logits(b))
    torch.testing.assert_close(loss(a, b), (lp + 0.1 * cn) / 1.1)
    assert loss(a, a).abs() < 1e-6
    with pytest.raises(MissingWeightsError, match="vgg16-missing.pth"):
        PerceptualLoss(str(tmp_path / "vgg16-missing.pth"), "random")


@pytest.mark.quick
def test_perceptual_gradients_reach_the_image_only():
    loss = PerceptualLoss("random", "random", convnext_size=32)
    a = torch.rand(2, 3, 16, 16, requires_grad=True)
    loss(a, torch.rand(2, 3, 16, 16)).backward()
    assert a.grad is not None and a.grad.abs().sum() > 0
    assert all(p.grad is None for p in loss.parameters())


@pytest.mark.quick
def test_semantic_loss_is_one_minus_cosine():
    p, t = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    assert torch.allclose(semantic_loss(p, t), (1 - F.cosine_similarity(p, t, dim=-1)).mean())
    assert semantic_loss(t, 3 * t).abs() < 1e-6


@pytest.mark.quick
def test_patchgan_layout_and_hinge():
    d = PatchGAN()
    convs = [m for m in d.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.stride[0] for c in convs] == [2, 2, 2, 1, 1] and all(c.kernel_size == (4, 4) for c in convs)
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in d.modules()) == 3
    assert d(torch.rand(2, 3, 256, 256)).shape == (2, 1, 30, 30)
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    assert hinge_d_loss(real, fake) == pytest.approx(0.5 * (0.25 + 0.75))
    assert generator_adv_loss(fake) == pytest.approx(0.75)


@pytest.mark.quick
@pytest.mark.parametrize("name,prefix", [("dinov3-l16", 5), ("dinov2-l14", 1), ("dinov2-l14-reg4", 5),
                                         ("siglip2-l16", 0)])
def test_full_size_teachers_have_the_paper_shapes(name, prefix):
    from models.teachers import TEACHERS
    with torch.device("meta"):
        t = Teacher(name, "random")
    assert t.dim == 1024 and TEACHERS[name].grid == 16  # 16x16 tokens, aligned with the tokenizer
    assert t.net.num_prefix_tokens == prefix
    assert 300e6 < sum(p.numel() for p in t.parameters()) < 320e6


@pytest.mark.quick
def test_perceptual_loss_in_bf16_channels_last_is_within_bf16_of_fp32():
    """The CUDA path (bf16 autocast, NHWC networks and inputs), run on a CPU: the same loss within bf16
    rounding, and a gradient on the image pointing the same way."""
    torch.manual_seed(0)
    fp32 = PerceptualLoss("random", "random", convnext_size=32)
    bf16 = PerceptualLoss("random", "random", convnext_size=32, autocast_dtype=torch.bfloat16, channels_last=True)
    bf16.load_state_dict(fp32.state_dict())
    assert bf16.lpips.net.slice1[0].weight.is_contiguous(memory_format=torch.channels_last)
    real = torch.rand(2, 3, 32, 32)
    fake = (real + 0.2 * torch.randn_like(real)).clamp(0, 1)
    grads = []
    for loss in (fp32, bf16):
        a = fake.clone().requires_grad_(True)
        value = loss(a, real)
        value.backward()
        assert value.dtype == torch.float32
        grads.append((value.detach(), a.grad))
    (v32, g32), (v16, g16) = grads
    torch.testing.assert_close(v16, v32, rtol=2e-2, atol=1e-3)
    assert F.cosine_similarity(g16.flatten(), g32.flatten(), dim=0) > 0.97
    assert all(p.grad is None for p in bf16.parameters())
