"""MusicGen (``transformers.MusicgenForConditionalGeneration``) behind the policy interface.

The directory is what ``save_pretrained`` writes (config, weights, generation
config) plus the T5 tokenizer: a snapshot of ``facebook/musicgen-small`` as
downloaded, or a version written by ``MusicgenPolicy.save`` (which adds
``policy.json`` with the guidance scale). Mono checkpoints only.

Tokens are EnCodec codes ``[B, K, T]`` (K = 4 codebooks at 50 frames/s for
the 32 kHz checkpoints). The decoder predicts all K codebooks at once but
with MusicGen's delay pattern: codebook k runs k steps late, so at sequence
position j it holds frame ``j - k - 1`` (position 0 is the BOS, equal to the
pad id, and every slot outside a codebook's frames is the pad id). A clip of
T frames is a sequence of ``T + K`` positions, ``T + K - 1`` decoding steps.
This is exactly the layout of the decoder's ``build_delay_pattern_mask``,
written out here because training needs it in both directions: ``delay``
interleaves codes for teacher forcing, and ``forward`` picks each
codebook's logits back out of the delayed positions, so callers only ever see
``logits[:, k, t]`` predicting ``tokens[:, k, t]``. Sampling fills the same
layout one position at a time with a KV cache and draws a codebook's frame
only where the pattern says it is real, so its log-probs are those of
``forward`` on the sampled tokens (tested).

Classifier-free guidance (``guidance_scale`` > 1, MusicGen's default 3) runs
every batch twice, with the prompt and with a null condition (zero text
states, all masked), and samples from ``uncond + scale * (cond - uncond)`` of
the logits, as ``generate`` does; ``forward`` returns those guided logits, so
log-probs, KL and REINFORCE are all taken of the distribution that was sampled.

Per-row randomness: row i draws its uniforms from
``numpy.random.default_rng(seeds[i])`` as a ``[T, K]`` table (inverse-CDF
sampling), so its clip depends only on its own seed, prompt and settings,
never on the batch. Unlike the default generator, a shorter clip is not the
prefix of a longer one: at the end of a clip the delay pattern pads the early
codebooks, which the late codebooks' last frames see (``prefix_stable`` is False).

The T5 text encoder and the EnCodec codec are frozen; the decoder (and the
projection of text states into it) is the policy that RL trains.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from musicrl.models.generator import draw, sampling_rows
from musicrl.models.policy import POLICY_FILE, Policy

META_FILE = "meta.json"


@dataclass
class TextCondition:
    """The frozen T5's last hidden states [B, S, H] for the prompts, and their attention mask [B, S]."""

    states: torch.Tensor
    mask: torch.Tensor


def delay(tokens: torch.Tensor, pad: int) -> torch.Tensor:
    """Codes [B, K, T] in the delay layout [B, K, T + K]: BOS/pad at position 0, codebook k at positions k+1..k+T."""
    B, K, T = tokens.shape
    out = torch.full((B, K, T + K), pad, dtype=tokens.dtype, device=tokens.device)
    for k in range(K):
        out[:, k, k + 1 : k + 1 + T] = tokens[:, k]
    return out


class MusicgenPolicy(Policy):
    kind = "musicgen"
    prefix_stable = False

    def __init__(self, model, tokenizer, guidance_scale: float = 1.0) -> None:
        super().__init__()
        config = model.config
        if config.decoder.audio_channels != 1:
            raise ValueError("only mono MusicGen checkpoints are supported (stereo interleaves 2 x K codebooks)")
        if guidance_scale < 1.0:
            raise ValueError(f"guidance_scale must be >= 1 (1 disables guidance), got {guidance_scale}")
        self.model = model
        self.tokenizer = tokenizer
        self.guidance_scale = float(guidance_scale)
        model.text_encoder.requires_grad_(False)
        model.audio_encoder.requires_grad_(False)
        self.num_codebooks = int(config.decoder.num_codebooks)
        self.vocab_size = int(config.decoder.vocab_size)
        self.pad = int(config.decoder.pad_token_id)  # also the BOS of every codebook
        self.sample_rate = int(config.audio_encoder.sampling_rate)
        self.frame_rate = float(config.audio_encoder.frame_rate)
        self.max_frames = int(config.decoder.max_position_embeddings) - self.num_codebooks
        self.train(model.training)

    # ------------------------------------------------------------------ loading and saving

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> MusicgenPolicy:
        from transformers import AutoTokenizer, MusicgenForConditionalGeneration  # noqa: PLC0415 - heavy

        directory = Path(directory)
        model = MusicgenForConditionalGeneration.from_pretrained(directory, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        settings = json.loads((directory / POLICY_FILE).read_text()) if (directory / POLICY_FILE).is_file() else {}
        # A plain snapshot samples as its generation config says (musicgen-small: guidance 3).
        guidance = settings.get("guidance_scale", model.generation_config.guidance_scale or 1.0)
        return cls(model.to(device), tokenizer, guidance)

    def save(self, directory, meta=None) -> Path:
        directory = Path(directory)
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        (directory / POLICY_FILE).write_text(
            json.dumps({"kind": self.kind, "guidance_scale": self.guidance_scale}, indent=2) + "\n"
        )
        (directory / META_FILE).write_text(json.dumps(meta or {}, indent=2, sort_keys=True) + "\n")
        return directory

    # ------------------------------------------------------------------ conditioning

    @property
    def device(self) -> torch.device:
        return self.model.decoder.lm_heads[0].weight.device

    def train(self, mode: bool = True) -> MusicgenPolicy:
        """Train mode reaches the decoder only: the frozen T5 and EnCodec stay in eval mode (no dropout)."""
        super().train(mode)
        self.model.text_encoder.eval()
        self.model.audio_encoder.eval()
        return self

    @torch.no_grad()
    def condition(self, prompts: Sequence[str]) -> TextCondition:
        inputs = self.tokenizer(list(prompts), padding=True, return_tensors="pt")
        ids, mask = inputs["input_ids"].to(self.device), inputs["attention_mask"].to(self.device)
        return TextCondition(self.model.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state, mask)

    def _cross_attention_inputs(self, cond: TextCondition) -> tuple[torch.Tensor, torch.Tensor]:
        """Text states as the decoder's cross-attention reads them (projected, padding zeroed), with the null
        condition appended as the second half of the batch when guidance is on."""
        states = cond.states
        if hasattr(self.model, "enc_to_dec_proj"):  # T5 width != decoder width
            states = self.model.enc_to_dec_proj(states)
        mask = cond.mask
        states = states * mask[..., None].to(states.dtype)
        if self.guidance_scale > 1.0:
            states, mask = torch.cat([states, torch.zeros_like(states)]), torch.cat([mask, torch.zeros_like(mask)])
        return states, mask

    def _logits(
        self, delayed: torch.Tensor, states: torch.Tensor, mask: torch.Tensor, use_cache: bool = False, cache=None
    ):
        """Guided logits [B, K, L, V] of the next position after each of ``delayed`` [B, K, L], and the KV cache
        (``use_cache``: the decoder creates one on the first call; pass it back on the next)."""
        B, K, L = delayed.shape
        ids = delayed.reshape(B * K, L)
        if self.guidance_scale > 1.0:
            ids = ids.repeat(2, 1)
        out = self.model.decoder(
            input_ids=ids, encoder_hidden_states=states, encoder_attention_mask=mask, cache=cache, use_cache=use_cache
        )
        logits = out.logits.float().view(-1, K, L, self.vocab_size)
        if self.guidance_scale > 1.0:
            conditional, unconditional = logits[:B], logits[B:]
            logits = unconditional + self.guidance_scale * (conditional - unconditional)
        return logits, out.cache

    # ------------------------------------------------------------------ teacher forcing

    def forward(self, cond: TextCondition, tokens: torch.Tensor) -> torch.Tensor:
        B, K, T = tokens.shape
        if K != self.num_codebooks:
            raise ValueError(f"tokens must be [B, {self.num_codebooks}, T], got {tuple(tokens.shape)}")
        states, mask = self._cross_attention_inputs(cond)
        logits, _ = self._logits(delay(tokens, self.pad)[..., :-1], states, mask)  # [B, K, T + K - 1, V]
        # Codebook k's frame t sits at delayed position t + k + 1, predicted by the logits at t + k.
        index = torch.arange(T, device=tokens.device)[None, :] + torch.arange(K, device=tokens.device)[:, None]
        return logits.gather(2, index[None, :, :, None].expand(B, K, T, self.vocab_size))

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()  # not inference_mode: the tokens are fed to a later backward pass (RL)
    def sample(self, cond: TextCondition, n_frames: int, temperature=1.0, top_k=0, seeds=None):
        B, K = cond.states.shape[0], self.num_codebooks
        if not 1 <= n_frames <= self.max_frames:
            raise ValueError(f"n_frames must be in 1..{self.max_frames}, got {n_frames}")
        seeds = list(range(B)) if seeds is None else [int(s) for s in seeds]
        if len(seeds) != B:
            raise ValueError(f"got {len(seeds)} seeds for a batch of {B}")
        device = self.device
        temperatures, top_ks = sampling_rows(temperature, top_k, B)
        temperatures, top_ks = temperatures.to(device), top_ks.clamp(max=self.vocab_size).to(device)
        uniforms = torch.from_numpy(np.stack([np.random.default_rng(s).random((n_frames, K)) for s in seeds])).to(
            device
        )

        states, mask = self._cross_attention_inputs(cond)
        delayed = torch.full((B, K, n_frames + K), self.pad, dtype=torch.long, device=device)
        tokens = torch.empty(B, K, n_frames, dtype=torch.long, device=device)
        logprobs = torch.empty(B, K, n_frames, dtype=torch.float32, device=device)
        cache = None
        for position in range(1, n_frames + K):
            logits, cache = self._logits(
                delayed[..., position - 1 : position], states, mask, use_cache=True, cache=cache
            )
            for k in range(K):
                frame = position - k - 1
                if 0 <= frame < n_frames:  # elsewhere the pattern holds the pad id
                    token, logprob = draw(logits[:, k, -1], temperatures, top_ks, uniforms[:, frame, k])
                    delayed[:, k, position], tokens[:, k, frame], logprobs[:, k, frame] = token, token, logprob
        return tokens, logprobs

    # ------------------------------------------------------------------ audio

    @torch.no_grad()
    def decode(self, tokens) -> np.ndarray:
        codes = torch.as_tensor(tokens, dtype=torch.long).to(self.device)
        audio = self.model.audio_encoder.decode(codes[None], [None] * codes.shape[0]).audio_values  # [B, 1, samples]
        return audio[:, 0].clamp(-1.0, 1.0).float().cpu().numpy()
