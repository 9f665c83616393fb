"""The paper's small convolutional networks (Conv2/4/6), adapted to 28x28 single-channel images.

They come from the lottery-ticket line of work that edge-popup builds on: pairs of 3x3 convs
(64, 128, 256 channels) with max-pooling after each pair, then fully connected 256-256-classes,
ReLU everywhere, no biases and no normalisation. They live in the library (not in a recipe) so
that an artifact trained on one can rebuild it from its spec alone.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .errors import ConfigError

#: channels of the conv pairs, per depth
CONV_STAGES = {2: (64,), 4: (64, 128), 6: (64, 128, 256)}


class ConvNet(nn.Module):
    """``Conv{depth}`` of the paper, ``width`` times as wide, for ``image_size`` inputs."""

    def __init__(
        self,
        depth: int = 4,
        width: float = 1.0,
        in_chans: int = 1,
        num_classes: int = 10,
        image_size: int = 28,
    ) -> None:
        """Build a ConvNet.

        Args:
            depth: 2, 4 or 6 convolutions (Conv2/4/6 of the paper).
            width: a multiplier of every layer's channels.
            in_chans: input channels.
            num_classes: outputs.
            image_size: the input's side (sets the classifier's input size).

        Raises:
            ConfigError: an unknown depth or a non-positive width.
        """
        super().__init__()
        if depth not in CONV_STAGES:
            raise ConfigError(f"depth must be one of {sorted(CONV_STAGES)}, got {depth}")
        if width <= 0:
            raise ConfigError(f"width must be positive, got {width}")
        layers: list[nn.Module] = []
        channels, size = in_chans, image_size
        for stage_channels in CONV_STAGES[depth]:
            out = max(1, round(stage_channels * width))
            layers += [
                nn.Conv2d(channels, out, 3, padding=1, bias=False),
                nn.ReLU(),
                nn.Conv2d(out, out, 3, padding=1, bias=False),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            channels, size = out, size // 2
        hidden = max(1, round(256 * width))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * size * size, hidden, bias=False),
            nn.ReLU(),
            nn.Linear(hidden, hidden, bias=False),
            nn.ReLU(),
            nn.Linear(hidden, num_classes, bias=False),
        )
        self.spec = {
            "depth": depth,
            "width": width,
            "in_chans": in_chans,
            "num_classes": num_classes,
            "image_size": image_size,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a batch of ``(in_chans, image_size, image_size)`` images.

        Args:
            x: ``(batch, in_chans, image_size, image_size)``.

        Returns:
            ``(batch, num_classes)`` logits.
        """
        return self.classifier(self.features(x))


def create_conv_net(name: str = "conv4", **kwargs: Any) -> ConvNet:
    """The paper's ConvX by name: ``create_conv_net("conv6", width=0.5)``.

    Args:
        name: ``conv2``, ``conv4`` or ``conv6``.
        **kwargs: [`ConvNet`][popup_adapter.ConvNet]'s ``width``, ``in_chans``, ``num_classes``,
            ``image_size``.

    Returns:
        The network, with random weights (``get_popup_model`` redraws them from the seed).

    Raises:
        ConfigError: an unknown name, depth or width.
    """
    if not (name.startswith("conv") and name[4:].isdigit()):
        raise ConfigError(f"unknown conv net {name!r}; choose conv2, conv4 or conv6")
    return ConvNet(depth=int(name[4:]), **kwargs)
