"""The Bradley-Terry preference reward model of a MusicGen policy, initialised from the policy's decoder.

The paper initialises the reward model from the generator it judges; for MusicGen the trunk is a
frozen copy of the policy itself (T5, the text projection and the decoder): a clip's feature is the
mean over its sequence positions of the decoder's last hidden states (after the final layer norm),
for the clip's codes ``[K, T]`` in the delay layout (``musicrl.models.musicgen.delay``) conditioned on
the prompt by T5 without guidance. The heads are the same as the default model's
(``musicrl.models.preference.PreferenceRewardModel``): ``n_heads`` linear heads, the served score is
their mean minus ``disagreement_penalty`` times their standard deviation, and the default fit
(``fit_preference_heads``: frozen trunk, L2 Bradley-Terry heads on feature differences, one bootstrap
resample per head, k-fold cross-validated check) runs on it unchanged through :meth:`clip_pair_features`.

Long clips are scored as the default model scores them: on the first and the last 20 s
(``EDGE_WINDOW_S``, in the policy's own frames), the window features averaged.

Differences from the default model, by decision:

- The condition is the prompt's text (T5 runs inside), not a MiniLM embedding: a pair's ``prompt``
  is used, its ``cond`` ignored.
- Only the probe fit: fine-tuning a 300M-parameter decoder as a reward model on a few hundred votes
  per cycle is what the default's measurements advise against (docs/finetune.md), and its cost is not
  that of the default model.
- Saved as a directory of its own (``policy.json`` says ``musicgen``): ``trunk/`` (the policy's version
  directory), ``heads.pt`` and ``meta.json``. No ONNX export: the reward service scores preference
  with a token model over the default codec, so a MusicGen policy's cycle scores this model in the
  worker (``finetune_worker.rewards.PolicyRewardFunction``).
"""

from __future__ import annotations

import copy
import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from musicrl.models.musicgen import MusicgenPolicy, TextCondition, delay
from musicrl.models.policy import POLICY_FILE, load_policy
from musicrl.models.preference import ENSEMBLE_KEY, PreferencePair, PreferenceRewardModel
from musicrl.rewards.windowing import EDGE_WINDOW_S, edge_windows

KIND = "musicgen"
TRUNK_DIR = "trunk"
HEADS_FILE = "heads.pt"
META_FILE = "meta.json"


def is_musicgen_preference_dir(directory: str | Path) -> bool:
    path = Path(directory) / POLICY_FILE
    return (
        path.is_file() and json.loads(path.read_text()).get("kind") == KIND and (Path(directory) / HEADS_FILE).is_file()
    )


class MusicgenPreferenceModel(nn.Module):
    """Frozen MusicGen trunk + ``n_heads`` scalar heads; ``score(prompts, clips) -> [N]``."""

    kind = KIND

    def __init__(self, trunk: MusicgenPolicy, n_heads: int = 1, disagreement_penalty: float = 0.0) -> None:
        super().__init__()
        if n_heads < 1:
            raise ValueError(f"n_heads must be at least 1, got {n_heads}")
        if not disagreement_penalty >= 0:
            raise ValueError(f"disagreement_penalty must be >= 0, got {disagreement_penalty}")
        self.trunk = trunk.eval().requires_grad_(False)
        self.n_heads = int(n_heads)
        self.disagreement_penalty = float(disagreement_penalty)
        self.hidden_size = int(trunk.model.decoder.config.hidden_size)
        self.window_frames = trunk.frames_for(EDGE_WINDOW_S)
        self.head = nn.Linear(self.hidden_size, self.n_heads)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_policy(
        cls, policy: MusicgenPolicy, n_heads: int = 1, disagreement_penalty: float = 0.0
    ) -> MusicgenPreferenceModel:
        """A reward model whose trunk is a copy of ``policy`` (which is left untouched)."""
        return cls(copy.deepcopy(policy), n_heads, disagreement_penalty)

    @property
    def ensemble(self) -> dict:
        return {"n_heads": self.n_heads, "disagreement_penalty": self.disagreement_penalty}

    combine = PreferenceRewardModel.combine  # mean - penalty * std over heads, as the default model serves

    # ------------------------------------------------------------------ features

    @torch.no_grad()
    def pooled(self, cond: TextCondition, codes: torch.Tensor) -> torch.Tensor:
        """Mean over positions 1..T+K-1 of the decoder's last hidden states [B, H] for codes [B, K, T]
        in the delay layout (position 0, the BOS, carries no frame)."""
        trunk = self.trunk
        B, K, T = codes.shape
        states = cond.states
        if hasattr(trunk.model, "enc_to_dec_proj"):
            states = trunk.model.enc_to_dec_proj(states)
        states = states * cond.mask[..., None].to(states.dtype)
        ids = delay(codes.to(trunk.device), trunk.pad).reshape(B * K, T + K)
        hidden = trunk.model.decoder.model(
            input_ids=ids, encoder_hidden_states=states, encoder_attention_mask=cond.mask
        ).last_hidden_state  # [B, T + K, H]
        return hidden[:, 1:].float().mean(dim=1)

    @torch.no_grad()
    def clip_features(self, prompts: Sequence[str], clips: Sequence[np.ndarray], batch_size: int = 32) -> torch.Tensor:
        """One feature [N, H] per clip ``[K, T]``: the mean of its windows' pooled states (one window when it fits)."""
        windows: dict[int, list[tuple[int, np.ndarray]]] = defaultdict(list)  # window length -> (clip, codes)
        counts = np.zeros(len(clips))
        for i, clip in enumerate(clips):
            clip = np.asarray(clip, dtype=np.int64)
            if clip.ndim != 2 or clip.shape[0] != self.trunk.num_codebooks or clip.shape[1] == 0:
                raise ValueError(
                    f"a clip must be [{self.trunk.num_codebooks}, T] codes with T > 0, got shape {clip.shape}"
                )
            for start, end in edge_windows(clip.shape[1], self.window_frames):
                windows[end - start].append((i, clip[:, start:end]))
                counts[i] += 1
        features = torch.zeros(len(clips), self.hidden_size)
        for rows in windows.values():  # same-length windows together: no padding inside the delay pattern
            for start in range(0, len(rows), batch_size):
                chunk = rows[start : start + batch_size]
                owners = [i for i, _ in chunk]
                cond = self.trunk.condition([prompts[i] for i in owners])
                pooled = self.pooled(cond, torch.from_numpy(np.stack([codes for _, codes in chunk]))).cpu()
                features.index_add_(0, torch.tensor(owners), pooled)
        return features / torch.from_numpy(counts).float().unsqueeze(1)

    def clip_pair_features(
        self, pairs: Sequence[PreferencePair], window_frames: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """([N, H] preferred, [N, H] other): what ``fit_preference_heads`` fits the heads on (``window_frames`` is the
        default model's, in its own frames: this model windows in the policy's frames)."""
        prompts = [pair.prompt for pair in pairs]
        if any(not p for p in prompts):
            raise ValueError("a MusicGen preference pair needs its prompt (T5 conditions the trunk)")
        features = self.clip_features(prompts + prompts, [p.preferred for p in pairs] + [p.other for p in pairs])
        return features[: len(pairs)], features[len(pairs) :]

    # ------------------------------------------------------------------ scoring

    @torch.no_grad()
    def score(self, prompts: Sequence[str], clips: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
        """Served score [N] of each clip (``[K, T]`` codes) for its prompt."""
        if len(prompts) != len(clips):
            raise ValueError(f"{len(prompts)} prompts for {len(clips)} clips")
        if not len(clips):
            return np.zeros(0, dtype=np.float32)
        heads = self.head(self.clip_features(list(prompts), list(clips)).to(self.head.weight.dtype))
        return self.combine(heads).numpy().astype(np.float32)

    # ------------------------------------------------------------------ saving and loading

    def save(self, directory: str | Path, meta: dict | None = None) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.trunk.save(directory / TRUNK_DIR, {"role": "preference trunk"})
        torch.save(
            {"weight": self.head.weight.detach().cpu(), "bias": self.head.bias.detach().cpu()}, directory / HEADS_FILE
        )
        (directory / POLICY_FILE).write_text(json.dumps({"kind": KIND}, indent=2) + "\n")
        (directory / META_FILE).write_text(
            json.dumps({**(meta or {}), ENSEMBLE_KEY: self.ensemble}, indent=2, sort_keys=True) + "\n"
        )
        return directory


def load_musicgen_preference_model(
    directory: str | Path, device: str | torch.device = "cpu"
) -> tuple[MusicgenPreferenceModel, dict]:
    """The model :meth:`MusicgenPreferenceModel.save` wrote, and its meta."""
    directory = Path(directory)
    if not is_musicgen_preference_dir(directory):
        raise ValueError(f"{directory} is not a MusicGen preference model (policy.json kind {KIND!r} and {HEADS_FILE})")
    meta = json.loads((directory / META_FILE).read_text()) if (directory / META_FILE).is_file() else {}
    ensemble = meta.get(ENSEMBLE_KEY) or {}
    trunk = load_policy(directory / TRUNK_DIR, device)
    if not isinstance(trunk, MusicgenPolicy):
        raise ValueError(f"{directory / TRUNK_DIR} does not hold a MusicGen policy")
    model = MusicgenPreferenceModel(
        trunk, int(ensemble.get("n_heads", 1)), float(ensemble.get("disagreement_penalty", 0.0))
    )
    heads = torch.load(directory / HEADS_FILE, map_location="cpu", weights_only=True)
    with torch.no_grad():
        model.head.weight.copy_(heads["weight"])
        model.head.bias.copy_(heads["bias"])
    return model.to(device).eval(), meta
