"""The flatq command with one more model registered: `tiny_nobn`, two convolutions and a
linear layer without BatchNorm. Without BatchNorm a DDP step over N shards computes the same
gradient as one process over the whole batch, which is what tests/train/test_ddp.py checks.

Usage (as `flatq`): python tests/tiny_model_cli.py pretrain --model tiny_nobn ...
             or:    torchrun --nproc_per_node 2 tests/tiny_model_cli.py pretrain ...
In-process (tests): `with registered(): main([...])`, so that the model is not left in the
registry for other test files (test_models walks every registered model).
"""

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from flatq.cli import main
from flatq.models import register_model
from flatq.models.registry import _REGISTRY

NAME = "tiny_nobn"


class TinyNoBN(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 8, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        x = self.conv2(self.conv1(x).relu()).relu()
        return self.fc(x.mean(dim=(2, 3)))


@contextmanager
def registered() -> Iterator[None]:
    register_model(NAME)(TinyNoBN)
    try:
        yield
    finally:
        del _REGISTRY[NAME]


if __name__ == "__main__":
    register_model(NAME)(TinyNoBN)
    sys.exit(main())
