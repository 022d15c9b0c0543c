"""Small custom networks for the latency benchmarks: structures the torchvision zoo covers thinly or not at all.

    attention_vit    patch embedding and hand-written multi-head self-attention blocks (qkv Linear, matmul, softmax)
    encoder_vit      the same shape of model built from nn.TransformerEncoder (batch_first, pre-norm)
    concat_group     two branches concatenated, then a grouped 3x3 convolution over the concatenation
    se_net           residual blocks with squeeze-excitation (global pool, two 1x1 convs, sigmoid gate)
    dw_separable     MobileNet-v1 style depthwise 3x3 + pointwise 1x1 blocks

Every factory builds its model under a fixed seed and sets `input_shape` on it (1, 3, 64, 64). NETS maps each
name to its factory; `loaded(name)` returns the estimators.modelspec.LoadedModel the benchmarks use (bench/ is
not a package, so these are not reachable as `package.module:factory` specs).
"""
from __future__ import annotations

import torch
from torch import nn

INPUT_SHAPE = (1, 3, 64, 64)


def _seeded(build):
    def factory() -> nn.Module:
        torch.manual_seed(0)
        model = build()
        model.input_shape = INPUT_SHAPE
        return model.eval()

    factory.__name__ = build.__name__
    factory.__doc__ = build.__doc__
    return factory


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class PatchEmbed(nn.Module):
    def __init__(self, dim: int, patch: int = 8, image: int = 64):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, patch)
        self.pos = nn.Parameter(torch.randn(1, (image // patch) ** 2, dim) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2) + self.pos


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5
        out = att.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(mlp, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class AttentionViT(nn.Module):
    def __init__(self, dim: int = 192, depth: int = 4, heads: int = 4, mlp: int = 384, classes: int = 100):
        super().__init__()
        self.embed = PatchEmbed(dim)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.blocks(self.embed(x))).mean(1))


class EncoderViT(nn.Module):
    def __init__(self, dim: int = 192, depth: int = 4, heads: int = 4, mlp: int = 384, classes: int = 100):
        super().__init__()
        self.embed = PatchEmbed(dim)
        layer = nn.TransformerEncoderLayer(dim, heads, mlp, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.encoder(self.embed(x))).mean(1))


class ConcatGroup(nn.Module):
    """Two branches (3x3 and 1x1-then-3x3) concatenated, a grouped 3x3 convolution over the concatenation, a 1x1."""

    def __init__(self, cin: int, branch: int, cout: int, groups: int, stride: int = 1):
        super().__init__()
        self.a = conv_bn(cin, branch, 3, stride)
        self.b = nn.Sequential(conv_bn(cin, branch // 2, 1), conv_bn(branch // 2, branch, 3, stride))
        self.group = conv_bn(2 * branch, 2 * branch, 3, groups=groups)
        self.fuse = conv_bn(2 * branch, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.group(torch.cat([self.a(x), self.b(x)], 1)))


class ConcatGroupNet(nn.Module):
    def __init__(self, classes: int = 100):
        super().__init__()
        self.stem = conv_bn(3, 32, 3, 2)
        self.stages = nn.Sequential(ConcatGroup(32, 32, 64, 4), ConcatGroup(64, 64, 128, 8, 2),
                                    ConcatGroup(128, 96, 192, 8, 2), ConcatGroup(192, 128, 256, 16, 2))
        self.head = nn.Linear(256, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)).mean((2, 3)))


class SqueezeExcite(nn.Module):
    def __init__(self, ch: int, reduction: int = 4):
        super().__init__()
        self.reduce = nn.Conv2d(ch, ch // reduction, 1)
        self.expand = nn.Conv2d(ch // reduction, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.reduce(x.mean((2, 3), keepdim=True)))
        return x * torch.sigmoid(self.expand(s))


class SEBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.body = nn.Sequential(conv_bn(cin, cout, 3, stride), conv_bn(cout, cout, 3, act=False), SqueezeExcite(cout))
        self.short = nn.Identity() if cin == cout and stride == 1 else conv_bn(cin, cout, 1, stride, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.short(x))


class SENet(nn.Module):
    def __init__(self, classes: int = 100):
        super().__init__()
        self.stem = conv_bn(3, 32, 3, 2)
        self.stages = nn.Sequential(SEBlock(32, 48), SEBlock(48, 96, 2), SEBlock(96, 96), SEBlock(96, 192, 2),
                                    SEBlock(192, 256, 2))
        self.head = nn.Linear(256, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)).mean((2, 3)))


class DepthwiseSeparable(nn.Module):
    def __init__(self, classes: int = 100):
        super().__init__()
        widths = [(32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2), (512, 512, 1)]
        blocks = [conv_bn(3, 32, 3, 2)]
        for cin, cout, stride in widths:
            blocks += [conv_bn(cin, cin, 3, stride, groups=cin), conv_bn(cin, cout, 1)]
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(512, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


attention_vit = _seeded(AttentionViT)
encoder_vit = _seeded(EncoderViT)
concat_group = _seeded(ConcatGroupNet)
se_net = _seeded(SENet)
dw_separable = _seeded(DepthwiseSeparable)

NETS = {"attention_vit": attention_vit, "encoder_vit": encoder_vit, "concat_group": concat_group, "se_net": se_net,
        "dw_separable": dw_separable}


def loaded(name: str):
    """The custom network `name` as the estimators load a model: eval mode, seeded weights, its input shape."""
    from estimators.modelspec import LoadedModel

    model = NETS[name]()
    return LoadedModel(spec=f"bench.nets:{name}", kind="factory", model=model, input_shape=INPUT_SHAPE)
