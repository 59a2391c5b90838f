"""Audio encoder over log-mel spectrograms: the trunk of the text-adherence and quality models.

The mel bands are the channels of a 1-D convolution over time (cheap on a CPU
and keeps absolute pitch, which the register attribute needs). Three strided
blocks take 50 mel frames/s down to 6.25/s, then mean and max pooling over time
(max pooling keeps short artefacts such as dropouts visible).

`AudioTextEncoder` maps a clip into the frozen text-embedding space (384-d,
L2-normalised): the MuLan/CLAP analogue trained contrastively in
`musicrl.models.train_audio`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from musicrl.audio.features import N_MELS

# Fixed input scaling of natural-log mel power (silence is log(1e-5) = -11.5).
MEL_SHIFT, MEL_SCALE = 5.0, 4.0


@dataclass
class AudioEncoderConfig:
    n_mels: int = N_MELS
    channels: tuple[int, ...] = (96, 128, 160)
    kernel: int = 5
    width: int = 192  # channels of the last (unstrided) block
    out_dim: int = 384
    dropout: float = 0.1


class ConvBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, kernel, stride=stride, padding=kernel // 2)
        self.norm = nn.BatchNorm1d(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.norm(self.conv(x)))


class AudioTrunk(nn.Module):
    """(B, n_mels, T) log-mel -> (B, 2 * width) pooled features."""

    def __init__(self, config: AudioEncoderConfig) -> None:
        super().__init__()
        widths = (config.n_mels, *config.channels)
        self.blocks = nn.Sequential(
            *[ConvBlock(a, b, config.kernel, stride=2) for a, b in zip(widths, widths[1:])],
            ConvBlock(widths[-1], config.width, 3, stride=1),
        )
        self.out_features = 2 * config.width

    def forward(self, mels: torch.Tensor) -> torch.Tensor:
        h = self.blocks((mels + MEL_SHIFT) / MEL_SCALE)
        return torch.cat([h.mean(dim=-1), h.amax(dim=-1)], dim=-1)


class AudioTextEncoder(nn.Module):
    """log-mel (B, n_mels, T) -> L2-normalised embedding (B, out_dim) in the text encoder's space."""

    def __init__(self, config: AudioEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.trunk = AudioTrunk(config)
        self.head = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(self.trunk.out_features, config.out_dim))
        # CLIP's learnable temperature, stored as log(1 / 0.07).
        self.logit_scale = nn.Parameter(torch.tensor(2.659))

    def forward(self, mels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.trunk(mels)), dim=-1)


def save_config(config: AudioEncoderConfig, directory: Path) -> None:
    (directory / "config.json").write_text(json.dumps(asdict(config), indent=2))


def load_config(directory: Path) -> AudioEncoderConfig:
    raw = json.loads((Path(directory) / "config.json").read_text())
    return AudioEncoderConfig(**(raw | {"channels": tuple(raw["channels"])}))
