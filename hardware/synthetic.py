"""Random synthetic CNNs for calibration: what the latency model is fitted on instead of real models.

Each network is drawn from a seeded generator over the building blocks deployed CNNs are made of:
a strided stem, plain conv-norm-activation stages, basic and bottleneck residual blocks (with grouped
3x3 convolutions), inverted residuals with depthwise 3x3/5x5 convolutions and optional
squeeze-excitation, ShuffleNetV2 units (channel split, concatenation and shuffle: a strided copy),
channel concatenation, max/avg pooling, and a classifier head of one or more
linear layers. Widths are drawn freely, so many are not multiples of 8 or 16 (as pruning leaves them),
and input resolution and batch size vary. None of this is a benchmark model, so a latency model fitted
here is tested, not tuned, on torchvision's architectures.
"""
from __future__ import annotations

import random

import torch
from torch import nn

ACTS = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish)


def _width(rng: random.Random, lo: int, hi: int) -> int:
    """A width in [lo, hi]: a third multiples of 16 (as designed networks), a third of 8, a third anything
    (as pruning leaves them)."""
    w = rng.randint(lo, max(lo, hi))
    r = rng.random()
    if r < 1 / 3:
        return max(16, (w // 16) * 16)
    if r < 2 / 3:
        return max(8, (w // 8) * 8)
    return w


class _CBA(nn.Sequential):
    def __init__(self, cin, cout, k, s, act, groups=1):
        super().__init__(nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), act())


class _Residual(nn.Module):
    def __init__(self, body: nn.Module, skip: nn.Module | None, act: nn.Module | None):
        super().__init__()
        self.body, self.skip, self.act = body, skip, act

    def forward(self, x):
        y = self.body(x) + (x if self.skip is None else self.skip(x))
        return self.act(y) if self.act is not None else y


class _SE(nn.Module):
    def __init__(self, c, r, act):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.act, self.fc2, self.gate = nn.Conv2d(c, r, 1), act(), nn.Conv2d(r, c, 1), nn.Sigmoid()

    def forward(self, x):
        return x * self.gate(self.fc2(self.act(self.fc1(self.pool(x)))))


class _Shuffle(nn.Module):
    """A ShuffleNetV2 unit: half the channels through a 1x1-depthwise-1x1 branch (the other half passed on, or, when
    it downsamples or widens, through a depthwise-1x1 branch of its own), concatenated, then shuffled across the two
    halves (view, transpose, contiguous: a strided copy)."""

    def __init__(self, cin: int, cout: int, stride: int, act, k: int):
        super().__init__()
        half = cout // 2
        self.split = stride == 1 and cin == cout
        src = half if self.split else cin
        self.left = None if self.split else nn.Sequential(
            nn.Conv2d(cin, cin, k, stride, k // 2, groups=cin, bias=False), nn.BatchNorm2d(cin),
            _CBA(cin, half, 1, 1, act))
        mid = cout - half
        self.right = nn.Sequential(_CBA(src, mid, 1, 1, act),
                                   nn.Conv2d(mid, mid, k, stride, k // 2, groups=mid, bias=False),
                                   nn.BatchNorm2d(mid), _CBA(mid, mid, 1, 1, act))

    def forward(self, x):
        if self.split:
            a, b = x.chunk(2, dim=1)
            y = torch.cat([a, self.right(b)], 1)
        else:
            y = torch.cat([self.left(x), self.right(x)], 1)
        n, c, h, w = y.shape
        return y.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)


class _Concat(nn.Module):
    def __init__(self, a: nn.Module, b: nn.Module):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], 1)


def _block(rng: random.Random, kind: str, cin: int, cout: int, stride: int, act) -> nn.Module:
    if kind == "plain":
        return _CBA(cin, cout, rng.choice((1, 3, 3, 5)), stride, act)
    if kind == "basic":
        body = nn.Sequential(_CBA(cin, cout, 3, stride, act), nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        skip = None if (cin == cout and stride == 1) else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                                                         nn.BatchNorm2d(cout))
        return _Residual(body, skip, act())
    if kind == "bottleneck":
        mid = max(4, _width(rng, cout // 6, cout // 2))
        groups = 1
        if rng.random() < 0.5:  # grouped 3x3 (ResNeXt, RegNet); pruning leaves group widths like 5 or 13
            gw = rng.choice((8, 16, 24, 32, 48, 64, 5, 11, 13, 22, 45))
            mid = max(gw, (mid // gw) * gw)
            groups = mid // gw
        body = nn.Sequential(_CBA(cin, mid, 1, 1, act), _CBA(mid, mid, 3, stride, act, groups),
                             nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
        skip = None if (cin == cout and stride == 1) else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                                                         nn.BatchNorm2d(cout))
        return _Residual(body, skip, act())
    if kind == "inverted":
        mid = max(8, int(cin * rng.choice((1, 2, 3, 4, 6))) - rng.randint(0, 7))
        layers: list[nn.Module] = [] if mid == cin else [_CBA(cin, mid, 1, 1, act)]
        layers.append(_CBA(mid, mid, rng.choice((3, 3, 5)), stride, act, groups=mid))
        if rng.random() < 0.4:
            layers.append(_SE(mid, max(4, mid // 4), act))
        layers += [nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        body = nn.Sequential(*layers)
        return _Residual(body, None, None) if (cin == cout and stride == 1) else body
    if kind == "shuffle":  # even widths (the shuffle swaps two halves)
        return _Shuffle(cin, cout, stride, act, rng.choice((3, 3, 5)))
    if kind == "concat":
        half = max(4, cout // 2)
        return _Concat(_CBA(cin, half, 1, stride, act), _CBA(cin, cout - half, 3, stride, act))
    raise ValueError(kind)


def synthetic_cnn(seed: int) -> tuple[nn.Module, tuple[int, ...]]:
    """A random CNN and its input shape (batch included); the same seed gives the same network and weights
    (the caller's torch random state is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _build(seed)


def _build(seed: int) -> tuple[nn.Module, tuple[int, ...]]:
    rng = random.Random(seed)
    act = rng.choice(ACTS)
    res = rng.choice((64, 96, 128, 160, 192, 224))
    batch = rng.choice((1, 1, 2, 4, 8))
    family = rng.choice(("plain", "basic", "bottleneck", "bottleneck", "inverted", "inverted", "shuffle", "mixed"))
    width = _width(rng, 8, 64)
    layers: list[nn.Module] = [_CBA(3, width, rng.choice((3, 5, 7)), 2, act)]
    if rng.random() < 0.5:
        layers.append(rng.choice((nn.MaxPool2d(3, 2, 1), nn.MaxPool2d(2, 2), nn.AvgPool2d(2))))
    c = width
    n_stages = rng.randint(2, 5)
    for s in range(n_stages):
        cout = _width(rng, int(c * 1.2), int(c * 2.5)) if s else _width(rng, c, 2 * c)
        cout = min(cout, 1024)
        for b in range(rng.randint(1, 3)):
            kind = family if family != "mixed" else rng.choice(("plain", "basic", "bottleneck", "inverted", "concat",
                                                                 "shuffle"))
            if kind == "plain" and rng.random() < 0.2:
                kind = "concat"
            if kind == "shuffle":
                cout += cout % 2  # two equal halves to shuffle
            layers.append(_block(rng, kind, c, cout, 2 if (b == 0 and s) else 1, act))
            c = cout
    if rng.random() < 0.5:
        head = _width(rng, c, 2 * c)
        layers.append(_CBA(c, head, 1, 1, act))
        c = head
    classes = rng.choice((10, 100, 1000))
    if rng.random() < 0.25:  # a VGG-style classifier: large linear layers whose weights stream from memory
        side = rng.choice((2, 4, 7))
        hidden = rng.choice((512, 1024, 2048, 4096))
        layers += [nn.AdaptiveAvgPool2d(side), nn.Flatten(), nn.Linear(c * side * side, hidden), act(), nn.Dropout(0.2),
                   nn.Linear(hidden, classes)]
    else:
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(c, classes)]
    return nn.Sequential(*layers).eval(), (batch, 3, res, res)


def pace_network() -> tuple[nn.Module, tuple[int, ...]]:
    """The fixed small CNN every host measurement is paced against (hardware.measure.PaceClock): a strided stem,
    an inverted residual (depthwise 3x3) with squeeze-excitation, a strided 3x3, a basic residual block, global
    pooling and a linear head, on a 3x96x96 input (a few ms on 2 threads). Always the same network and weights,
    so that its latency compares one moment of the machine with another, in one process or the next."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(20261129)
        act = nn.ReLU
        body = nn.Sequential(_CBA(24, 72, 1, 1, act), _CBA(72, 72, 3, 1, act, groups=72), _SE(72, 18, act),
                             nn.Conv2d(72, 24, 1, bias=False), nn.BatchNorm2d(24))
        basic = nn.Sequential(_CBA(48, 48, 3, 1, act), nn.Conv2d(48, 48, 3, 1, 1, bias=False), nn.BatchNorm2d(48))
        model = nn.Sequential(_CBA(3, 24, 3, 2, act), _Residual(body, None, None), _CBA(24, 48, 3, 2, act),
                              _Residual(basic, None, act()), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(48, 10))
        for m in model.modules():  # non-trivial norms, as trained networks have
            if isinstance(m, nn.BatchNorm2d):
                nn.init.uniform_(m.weight, 0.5, 1.5)
                nn.init.uniform_(m.bias, -0.1, 0.1)
    return model.eval(), (1, 3, 96, 96)
