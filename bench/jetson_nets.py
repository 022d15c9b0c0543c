"""Networks the Jetson Nano comparison (bench/jetson_nano.py) needs that torchvision does not ship.

    fast_scnn_HxW    Fast-SCNN (Poudel et al. 2019), 19 classes, at the input sizes of the published Jetson Nano
                     trtexec logs (FAST_SCNN_SIZES)

The Fast-SCNN here is the network those logs timed: Tramac/Fast-SCNN-pytorch's FastSCNN (num_classes 19, aux off)
exported to ONNX by PINTO_model_zoo 228_Fast-SCNN; the layer list TensorRT printed in each log matches it layer
for layer (docs/jetson-nano.md). Written from that description, not copied:

- learning to downsample: 3x3 conv 3->32 stride 2 *without padding*, then two depthwise-separable convs
  (3x3 depthwise + 1x1) 32->48 and 48->64, both stride 2; BatchNorm + ReLU after every conv;
- global feature extractor: nine inverted-residual bottlenecks, expansion 6 (1x1 expand + ReLU, 3x3 depthwise +
  ReLU, 1x1 project, no activation), 64 x3 (first stride 2), 96 x3 (first stride 2), 128 x3 (stride 1); a residual
  add where stride is 1 and the width does not change;
- pyramid pooling: average pools to 1x1, 2x2, 3x3, 6x6, each a 1x1 conv 128->32 + ReLU and a bilinear resize back
  (align_corners), concatenated with the input (256 channels), then a 1x1 conv 256->128 + ReLU;
- feature fusion: the low-resolution branch resized x4 (bilinear), a 3x3 depthwise conv + ReLU and a 1x1 conv
  (with bias, BN, no ReLU); the 1/8-resolution branch a 1x1 conv 64->128 (bias, BN); added, then ReLU;
- classifier: two depthwise-separable convs 128->128, a 1x1 conv 128->19 (with bias); dropout is omitted (an
  identity in eval, absent from the exported engine);
- the logits resized bilinearly (align_corners) to the input size inside the network: the engines' output is
  1x19xHxW, no argmax.

NETS maps each name to its factory; `loaded(name)` returns the estimators.modelspec.LoadedModel the benchmark
analyses, as bench/nets.py does for its networks (bench/ is not a package).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CLASSES = 19
# (height, width) of the published trtexec logs (NobuoTsukamoto/benchmarks tensorrt/jetson/fast_scnn/result/)
FAST_SCNN_SIZES = ((384, 384), (384, 576), (576, 576), (576, 768), (768, 1344))
PPM_BINS = (1, 2, 3, 6)


def _unit(cin: int, cout: int, k: int = 1, stride: int = 1, pad: int | None = None, depthwise: bool = False,
          relu: bool = True, bias: bool = False) -> list[nn.Module]:
    """A convolution followed by BatchNorm and, where `relu`, a ReLU (as modules, to splice into a Sequential)."""
    pad = k // 2 if pad is None else pad
    out: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, pad, groups=cin if depthwise else 1, bias=bias),
                            nn.BatchNorm2d(cout)]
    return out + [nn.ReLU(inplace=True)] if relu else out


def _separable(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    """3x3 depthwise (stride) then 1x1 pointwise, each with BN + ReLU."""
    return _unit(cin, cin, 3, stride, depthwise=True) + _unit(cin, cout)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int = 6):
        super().__init__()
        mid = cin * expand
        self.body = nn.Sequential(*_unit(cin, mid), *_unit(mid, mid, 3, stride, depthwise=True),
                                  *_unit(mid, cout, relu=False))
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual else y


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=tuple(int(s) for s in size), mode="bilinear", align_corners=True)


class FastSCNN(nn.Module):
    def __init__(self, classes: int = CLASSES):
        super().__init__()
        self.downsample = nn.Sequential(*_unit(3, 32, 3, 2, pad=0), *_separable(32, 48, 2), *_separable(48, 64, 2))
        blocks, cin = [], 64
        for cout, stride in ((64, 2), (96, 2), (128, 1)):
            for i in range(3):
                blocks.append(InvertedResidual(cin, cout, stride if i == 0 else 1))
                cin = cout
        self.extract = nn.Sequential(*blocks)
        self.pyramid = nn.ModuleList(nn.Sequential(*_unit(128, 32)) for _ in PPM_BINS)
        self.pyramid_out = nn.Sequential(*_unit(256, 128))
        self.fuse_low = nn.Sequential(*_unit(128, 128, 3, depthwise=True), *_unit(128, 128, relu=False, bias=True))
        self.fuse_high = nn.Sequential(*_unit(64, 128, relu=False, bias=True))
        self.head = nn.Sequential(*_separable(128, 128), *_separable(128, 128), nn.Conv2d(128, classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        high = self.downsample(x)
        low = self.extract(high)
        size = low.shape[2:]
        branches = [_resize(conv(F.adaptive_avg_pool2d(low, bins)), size) for bins, conv in zip(PPM_BINS, self.pyramid)]
        low = self.pyramid_out(torch.cat([low] + branches, 1))
        low = F.interpolate(low, scale_factor=4.0, mode="bilinear", align_corners=True)
        fused = torch.relu(self.fuse_low(low) + self.fuse_high(high))
        return _resize(self.head(fused), x.shape[2:])


def _factory(height: int, width: int):
    def factory() -> nn.Module:
        torch.manual_seed(0)
        model = FastSCNN()
        model.input_shape = (1, 3, height, width)
        return model.eval()

    factory.__name__ = f"fast_scnn_{height}x{width}"
    factory.__doc__ = f"Fast-SCNN, 19 classes, input 1x3x{height}x{width}"
    return factory


NETS = {f"fast_scnn_{h}x{w}": _factory(h, w) for h, w in FAST_SCNN_SIZES}


def loaded(name: str):
    """The network `name` as the estimators load a model: eval mode, seeded weights, its input shape."""
    from estimators.modelspec import LoadedModel

    model = NETS[name]()
    return LoadedModel(spec=f"bench.jetson_nets:{name}", kind="factory", model=model, input_shape=model.input_shape)
