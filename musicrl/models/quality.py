"""MOS regressor: log-mel -> mean opinion score in [1, 5].

The same convolutional trunk as the text-adherence encoder, with a scalar head
squashed into 1..5. Trained on clean and degraded renders
(`musicrl.audio.degrade`) in `musicrl.models.train_audio`.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from musicrl.models.audio_encoder import AudioEncoderConfig, AudioTrunk

MOS_MIN, MOS_MAX = 1.0, 5.0


class MosRegressor(nn.Module):
    """(B, n_mels, T) log-mel -> (B,) MOS in [1, 5]."""

    def __init__(self, config: AudioEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.trunk = AudioTrunk(config)
        self.head = nn.Sequential(
            nn.Linear(self.trunk.out_features, 64), nn.GELU(), nn.Dropout(config.dropout), nn.Linear(64, 1)
        )

    def forward(self, mels: torch.Tensor) -> torch.Tensor:
        return MOS_MIN + (MOS_MAX - MOS_MIN) * torch.sigmoid(self.head(self.trunk(mels)).squeeze(-1))
