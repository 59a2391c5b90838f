"""LAION-CLAP as the text-adherence reward (an `AudioTextModel`).

The directory is what ``save_pretrained`` writes for ``transformers.ClapModel``
plus its tokenizer and ``ClapFeatureExtractor`` (a snapshot of
``laion/clap-htsat-unfused`` has all three). CLAP has its own text tower, so
the prompt is embedded here, not with the project's frozen text encoder, and
its own front end: 48 kHz audio into a 64-band mel of at most 10 s. The suite
resamples each clip to ``sample_rate``, cuts it into the same 10 s windows as
for the default model (`musicrl.rewards.windowing`) and averages the cosines,
as MusicRL does with MuLan. Windows never exceed the feature extractor's
``max_length_s``, so neither its random crop (unfused checkpoints) nor its
fusion of crops (fused ones) ever applies and a score is deterministic.

The version names the directory's content (``clap-`` + sha256 of its files)
unless the caller knows a better one (the registry version it came from).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from musicrl.device import resolve_device
from musicrl.rewards.windowing import TEXT_SEGMENT_S
from musicrl.weights import directory_digest


class ClapTextAdherence:
    def __init__(self, model, tokenizer, feature_extractor, version: str, batch_size: int = 16) -> None:
        if feature_extractor.max_length_s < TEXT_SEGMENT_S:
            raise ValueError(
                f"CLAP's feature extractor takes at most {feature_extractor.max_length_s} s, "
                f"the text-adherence windows are {TEXT_SEGMENT_S} s"
            )
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.feature_extractor = feature_extractor
        self.version = version
        self.batch_size = batch_size
        self.sample_rate = int(feature_extractor.sampling_rate)
        self.device = next(model.parameters()).device

    @classmethod
    def load(cls, directory: str | Path, version: str | None = None, device: str = "auto") -> ClapTextAdherence:
        from transformers import AutoTokenizer, ClapFeatureExtractor, ClapModel  # noqa: PLC0415 - heavy

        directory = Path(directory)
        model = ClapModel.from_pretrained(directory, local_files_only=True).to(resolve_device(device))
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        features = ClapFeatureExtractor.from_pretrained(directory, local_files_only=True)
        return cls(model, tokenizer, features, version or f"clap-{directory_digest(directory)}")

    @torch.no_grad()
    def embed_text(self, prompts: Sequence[str]) -> np.ndarray:
        inputs = self.tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt")
        output = self.model.get_text_features(
            input_ids=inputs["input_ids"].to(self.device), attention_mask=inputs["attention_mask"].to(self.device)
        )
        return output.pooler_output.float().cpu().numpy()  # transformers 5: an output whose pooler is the unit vector

    @torch.no_grad()
    def embed_waves(self, waves: np.ndarray) -> np.ndarray:
        rows = []
        for start in range(0, len(waves), self.batch_size):
            batch = [np.asarray(w, dtype=np.float32) for w in waves[start : start + self.batch_size]]
            inputs = self.feature_extractor(batch, sampling_rate=self.sample_rate, return_tensors="pt")
            output = self.model.get_audio_features(
                input_features=inputs["input_features"].to(self.device), is_longer=inputs["is_longer"].to(self.device)
            )
            rows.append(output.pooler_output.float().cpu().numpy())
        return np.concatenate(rows)
