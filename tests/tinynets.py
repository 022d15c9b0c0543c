"""Tiny models for the tests (also used as `tinynets:NAME` factory specs)."""
import torch
from torch import nn


class HandNet(nn.Module):
    """conv(3->8, 3x3, bias) -> bn -> relu -> maxpool 2 -> flatten -> linear(128 -> 10), input 1x3x8x8."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=True)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        x = self.pool(self.relu(self.bn(self.conv(x))))
        return self.fc(torch.flatten(x, 1))


class CumsumNet(nn.Module):
    """Uses an op the cost registry does not know (cumsum): it must be listed as unsupported."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = self.conv(x).cumsum(dim=2)
        return self.fc(x.mean(dim=(2, 3)))


def hand_net():
    return HandNet()


def cumsum_net():
    return CumsumNet()


def broken_factory():
    raise RuntimeError("factory exploded")


def not_a_module():
    return 42


def five_class_net():
    """1x8x8 input, 5 classes: does not fit the 10 digit classes."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 5))


def tiny_loaders():
    """A package.module:function data spec: (train_loader, val_loader) of 1x8x8 inputs, 10 classes."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    x = torch.rand(40, 1, 8, 8, generator=g)
    y = torch.arange(40) % 10
    return DataLoader(TensorDataset(x, y), batch_size=8), DataLoader(TensorDataset(x, y), batch_size=16)


def not_loaders():
    return 42


class ConcatGroupedNet(nn.Module):
    """Two branches concatenated, then a grouped convolution over the concatenation: torch-pruning builds its
    graph but its step crashes on the branches' groups (RuntimeError: INDICES element is out of DATA bounds)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 1)
        self.group = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.fuse = nn.Conv2d(16, 12, 1)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = self.fuse(torch.relu(self.group(torch.cat([self.a(x), self.b(x)], 1))))
        return self.fc(x.mean((2, 3)))


def concat_grouped_net():
    return ConcatGroupedNet()


class LSTMNet(nn.Module):
    """A linear, an LSTM (an operator the cost registry does not know) and a linear head, input 1x5x8."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(8, 16)
        self.lstm = nn.LSTM(16, 24, batch_first=True)
        self.fc = nn.Linear(24, 3)

    def forward(self, x):
        y, _ = self.lstm(self.emb(x))
        return self.fc(y[:, -1])


def lstm_net():
    return LSTMNet()


def failing_loaders():
    """A data function that raises (a user's bug): one clean error, not a traceback."""
    raise OSError("dataset server unreachable")


class TwoInputNet(nn.Module):
    """Two positional inputs, an image (Nx3x8x8) and a vector (Nx16): conv(3->8, 3x3) -> relu -> global mean on
    the image, linear(16->8) -> relu on the vector, the two concatenated into a head linear(16->8) -> relu ->
    linear(8->4). Input shape 1,3,8,8;1,16."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.vec = nn.Linear(16, 8)
        self.head = nn.Linear(16, 8)
        self.fc = nn.Linear(8, 4)

    def forward(self, image, vector):
        a = torch.relu(self.conv(image)).mean((2, 3))
        b = torch.relu(self.vec(vector))
        return self.fc(torch.relu(self.head(torch.cat([a, b], 1))))


def two_input_net():
    return TwoInputNet()


class TinyConvNeXt(nn.Module):
    """A stem and one torchvision ConvNeXt block (dim 8): its MLP (Linear 8->32, GELU, Linear 32->8) runs on a
    channels-last 1x4x4xC tensor, so the pruned hidden channels are its last dim, not dim 1. Input 1x3x8x8."""

    def __init__(self):
        super().__init__()
        from torchvision.models.convnext import CNBlock

        self.stem = nn.Conv2d(3, 8, 2, stride=2)
        self.block = CNBlock(8, layer_scale=1e-6, stochastic_depth_prob=0.0)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.block(self.stem(x)).mean((2, 3)))


def tiny_convnext():
    return TinyConvNeXt()
