"""A block for tests/compiler/test_regions.py that lives in a module of its own, with a helper reading a
global of this module (Dynamo names it from the module of the code that reads it)."""
from __future__ import annotations

import torch
from torch import nn

GAIN = 2.0


def scaled(x: torch.Tensor) -> torch.Tensor:
    return x * GAIN


class GainBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return scaled(torch.tanh(self.lin(x)))
