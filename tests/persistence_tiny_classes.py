"""Tiny persistent classes for the persistence tests (test-only).

Their module source is what our pickles embed, so this file imports only numpy, torch and torch_utils.persistence.
"""

import numpy as np
import torch

from torch_utils import persistence


@persistence.persistent_class
class TinyLayer(torch.nn.Module):
    """y = x W^T gain + b."""

    def __init__(self, in_features, out_features, gain=1.0):
        super().__init__()
        self.gain = gain
        self.weight = torch.nn.Parameter(torch.randn(out_features, in_features) / np.sqrt(in_features))
        self.bias = torch.nn.Parameter(torch.randn(out_features) * 0.1)

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight * self.gain, self.bias)


@persistence.persistent_class
class TinyNet(torch.nn.Module):
    """Two TinyLayers in a ModuleDict (a plain torch container, as in SongUNet), a buffer and a scalar attribute."""

    def __init__(self, in_features, hidden=8, scale=0.5, out_gain=0.5):
        super().__init__()
        self.scale = scale
        self.layers = torch.nn.ModuleDict(dict(fc0=TinyLayer(in_features, hidden),
                                               fc1=TinyLayer(hidden, in_features, gain=out_gain)))
        self.register_buffer("offset", torch.randn(in_features))

    def forward(self, x):
        x = torch.nn.functional.silu(self.layers["fc0"](x + self.offset))
        return self.layers["fc1"](x) * self.scale


@persistence.persistent_class
class TinyLoss:
    """A plain (non-Module) persistent object, like EDMLoss."""

    def __init__(self, P_mean=-1.2, P_std=1.2):
        self.P_mean = P_mean
        self.P_std = P_std


class PlainThing:
    """Not persistent: pickles as a reference to this module, which the safe loader refuses."""

    def __init__(self, value=1):
        self.value = value


TINY_CLASSES = {"TinyNet": TinyNet, "TinyLayer": TinyLayer, "TinyLoss": TinyLoss}
