"""The text-conditioned music generator: a small decoder-only transformer over audio tokens.

nanoGPT-style (pre-LayerNorm blocks, fused QKV, GELU MLP, tied input/output
embeddings), conditioned on a frozen sentence embedding of the caption:

    condition(cond)   = cond_proj(cond) [+ attribute_proj(p)]
    position 0 input  = bos + condition(cond)                  (the BOS is internal)
    position t input  = tok_emb(tokens[t-1]) + condition(cond)
    every position    += pos_emb[t]
    with a beat clock: position t input += clock_proj(phases of frame t at the caption's BPM)
    logits[:, t]      = lm_head(ln_f(h_t)) [+ attribute_bias(p)]

so ``logits[:, t]`` is the distribution of ``tokens[:, t]`` given the caption
and ``tokens[:, :t]``. Adding the condition at every position (and not only as
a prefix) keeps a tiny model from forgetting the prompt over a long clip.

The optional attribute head reads named caption attributes (the key, the
tempo) off the sentence embedding: one linear softmax classifier per
attribute, trained with an auxiliary loss on the corpus's labels; p are their
probabilities, concatenated. Words like "minor" move a MiniLM embedding by ~2 %
of its length, too little for the linear ``cond_proj`` to pick up from
next-token loss (the pretrained model's first notes ignored the named key),
yet they are linearly decodable (>99 %). The head makes them features as loud
as the rest, and ``attribute_bias`` lets them shift the token distribution
directly: with the key as one 24-way attribute, a linear bias can prefer the
notes of that key's scale at every frame.

The optional beat clock gives every frame its phase within a half beat, a
beat, two beats and a bar at the BPM the head reads off the caption (its
expected value over BPM classes; training uses the clip's true BPM). Holding
a steady beat then needs no counting of frames since the last onset: the
pretrained model's onset rate followed the prompt, its inter-onset intervals did not.

Sampling runs one position at a time with a preallocated KV cache. Each row
draws its uniforms from its own ``numpy.random.default_rng(seed)``, so a row's
tokens depend only on its own (cond, seed, temperature, top_k, n_frames) and a
shorter clip is exactly the prefix of a longer one with the same seed.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from musicrl.audio import codec

CLOCK_PERIODS_BEATS = (0.5, 1.0, 2.0, 4.0)  # the corpus's note lengths run from half a beat to a bar
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.pt"
META_FILE = "meta.json"


@dataclass
class GeneratorConfig:
    vocab_size: int = codec.VOCAB_SIZE
    text_dim: int = 384
    text_encoder: str = "minilm"  # the frozen encoder the condition must come from (musicrl.text.load_text_encoder)
    max_frames: int = 512  # longest clip the position table covers
    n_layers: int = 4
    n_heads: int = 4
    d_model: int = 192
    dropout: float = 0.0
    # The attribute head (none by default): names of caption attributes and their number of values.
    attribute_names: tuple[str, ...] = ()
    attribute_sizes: tuple[int, ...] = ()
    # The beat clock (off by default): BPM at the centre of each class of the head's "bpm" attribute.
    bpm_bins: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        self.attribute_names, self.attribute_sizes = (
            tuple(self.attribute_names),
            tuple(self.attribute_sizes),
        )  # JSON gives lists
        if len(self.attribute_names) != len(self.attribute_sizes) or any(n < 2 for n in self.attribute_sizes):
            raise ValueError(
                f"attribute_names {self.attribute_names} and attribute_sizes {self.attribute_sizes} "
                "must pair up, 2+ values each"
            )
        self.bpm_bins = tuple(float(b) for b in self.bpm_bins)
        sizes = dict(zip(self.attribute_names, self.attribute_sizes, strict=True))
        if self.bpm_bins and sizes.get("bpm") != len(self.bpm_bins):
            raise ValueError(
                f"the beat clock needs a 'bpm' attribute with {len(self.bpm_bins)} classes (one per bpm_bins), "
                f"got {sizes}"
            )


class KVCache:
    """Preallocated keys and values of every layer for incremental decoding."""

    def __init__(self, config: GeneratorConfig, batch_size: int, max_len: int, device, dtype) -> None:
        head_dim = config.d_model // config.n_heads
        shape = (batch_size, config.n_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.length = 0


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GeneratorConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (z.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for z in (q, k, v))
        if cache is None:
            y = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
            )
        else:
            # Incremental decoding, one position at a time: it attends to everything cached plus itself.
            end = cache.length + 1
            cache.keys[layer][:, :, cache.length : end] = k
            cache.values[layer][:, :, cache.length : end] = v
            y = F.scaled_dot_product_attention(q, cache.keys[layer][:, :, :end], cache.values[layer][:, :, :end])
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, config: GeneratorConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.d_model, 4 * config.d_model)
        self.proj = nn.Linear(4 * config.d_model, config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    def __init__(self, config: GeneratorConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.d_model)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer)
        return x + self.mlp(self.ln_2(x))


class Generator(nn.Module):
    def __init__(self, config: GeneratorConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.max_frames, config.d_model)
        self.bos = nn.Parameter(torch.zeros(config.d_model))
        self.cond_proj = nn.Linear(config.text_dim, config.d_model)
        if config.attribute_sizes:
            self.attribute_logits = nn.Linear(config.text_dim, sum(config.attribute_sizes))
            self.attribute_proj = nn.Linear(sum(config.attribute_sizes), config.d_model)
            self.attribute_bias = nn.Linear(sum(config.attribute_sizes), config.vocab_size)
        if config.bpm_bins:
            self.register_buffer("bpm_bins", torch.tensor(config.bpm_bins), persistent=False)
            self.clock_proj = nn.Linear(2 * len(CLOCK_PERIODS_BEATS), config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # weight tying, as in GPT-2
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by the depth so the residual stream does not grow with it.
        for name, param in self.named_parameters():
            if name.endswith("proj.weight") and name.startswith("blocks."):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layers))
        if config.attribute_sizes:  # a head added to a trained model starts as a no-op
            nn.init.zeros_(self.attribute_proj.weight)
            nn.init.zeros_(self.attribute_bias.weight)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ conditioning

    def attribute_logits_of(self, cond: torch.Tensor) -> list[torch.Tensor]:
        """The attribute head's logits, one [B, size] tensor per attribute of ``config.attribute_names``."""
        return list(self.attribute_logits(cond).split(self.config.attribute_sizes, dim=-1))

    def condition(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What is added to every position's input [B, d_model], and to every position's logits [B, V] (None
        without a head)."""
        emb = self.cond_proj(cond)
        if not self.config.attribute_sizes:
            return emb, None
        probs = torch.cat([logits.softmax(-1) for logits in self.attribute_logits_of(cond)], dim=-1)
        return emb + self.attribute_proj(probs), self.attribute_bias(probs)

    def expected_bpm(self, cond: torch.Tensor) -> torch.Tensor:
        """[B]: the BPM the head reads off each caption (expected value over its BPM classes)."""
        logits = self.attribute_logits_of(cond)[self.config.attribute_names.index("bpm")]
        return logits.softmax(-1) @ self.bpm_bins

    def _clock(self, bpm: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """[B, T, d_model]: the beat clock at frames ``positions`` [T] for BPMs [B]."""
        beats = positions.float().unsqueeze(0) * bpm.unsqueeze(1) / (60.0 * codec.FRAME_RATE)
        angles = 2 * math.pi * beats.unsqueeze(-1) / torch.tensor(CLOCK_PERIODS_BEATS, device=bpm.device)
        return self.clock_proj(torch.cat([angles.sin(), angles.cos()], dim=-1))

    def _logits(self, hidden: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``lm_head`` of last-layer states [B, V] or [B, T, V], plus the head's bias [B, V] when there is one."""
        logits = self.lm_head(hidden)
        return logits if bias is None else logits + (bias.unsqueeze(1) if logits.ndim == 3 else bias)

    # ------------------------------------------------------------------ teacher forcing

    def _hidden(
        self, cond: torch.Tensor, tokens: torch.Tensor, bpm: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Last-layer states [B, T, d_model] (inputs: BOS, then the tokens shifted right by one) and the logit bias.

        ``bpm`` [B] sets the beat clock (training: the clips' true BPM); default: what the head reads off the caption.
        """
        self._check_inputs(cond, tokens)
        B, T = tokens.shape
        if T > self.config.max_frames:
            raise ValueError(f"{T} frames exceed max_frames={self.config.max_frames}")
        cond_emb, bias = self.condition(cond)
        bos = self.bos.expand(B, 1, -1)
        x = torch.cat([bos, self.tok_emb(tokens[:, : T - 1])], dim=1) if T > 0 else bos[:, :0]
        positions = torch.arange(T, device=tokens.device)
        x = x + cond_emb.unsqueeze(1) + self.pos_emb(positions)
        if self.config.bpm_bins:
            x = x + self._clock(self.expected_bpm(cond) if bpm is None else bpm, positions)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x), bias

    def hidden(self, cond: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Last-layer states [B, T, d_model]; state t has seen the caption and tokens[:, :t]."""
        return self._hidden(cond, tokens)[0]

    def forward(self, cond: torch.Tensor, tokens: torch.Tensor, bpm: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, V]: ``logits[:, t]`` is the distribution of ``tokens[:, t]`` (``bpm``: see ``_hidden``)."""
        return self._logits(*self._hidden(cond, tokens, bpm))

    def logprobs(
        self, cond: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0, top_k: int = 0
    ) -> torch.Tensor:
        """Log-probabilities [B, T] of ``tokens`` under the tempered, top-k-filtered policy (differentiable).

        With the sampling temperature and top-k, these are the log-probs ``sample`` returned.
        """
        logits = self(cond, tokens)
        B, T, V = logits.shape
        flat = filter_logits(
            logits.reshape(B * T, V),
            torch.full((B * T,), float(temperature), device=logits.device),
            torch.full((B * T,), int(top_k), device=logits.device),
        )
        return F.log_softmax(flat, dim=-1).gather(-1, tokens.reshape(B * T, 1)).view(B, T)

    def _check_inputs(self, cond: torch.Tensor, tokens: torch.Tensor) -> None:
        if cond.ndim != 2 or cond.shape[1] != self.config.text_dim:
            raise ValueError(f"cond must be [B, {self.config.text_dim}], got {tuple(cond.shape)}")
        if tokens.ndim != 2 or tokens.shape[0] != cond.shape[0]:
            raise ValueError(f"tokens must be [B, T] with B={cond.shape[0]}, got {tuple(tokens.shape)}")

    # ------------------------------------------------------------------ sampling

    def _step(self, x: torch.Tensor, cache: KVCache, bias: torch.Tensor | None) -> torch.Tensor:
        """Logits [B, V] for the next token after feeding one position ``x`` [B, 1, d_model]."""
        for layer, block in enumerate(self.blocks):
            x = block(x, cache, layer)
        cache.length += 1
        return self._logits(self.ln_f(x[:, -1]), bias)

    @torch.no_grad()  # not inference_mode: the returned tokens must be usable in a later backward pass (RL)
    def sample(
        self,
        cond: torch.Tensor,
        n_frames: int,
        temperature: float | Sequence[float] = 0.99,
        top_k: int | Sequence[int] = 0,
        seeds: Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample ``n_frames`` tokens per row with a KV cache.

        ``temperature`` and ``top_k`` are one value for the batch or one per row
        (``top_k=0`` keeps the whole vocabulary). Returns tokens [B, T] and the
        log-probabilities [B, T] of the sampled tokens under the
        temperature-scaled, top-k-filtered distribution they were drawn from.
        """
        cond = torch.as_tensor(cond, dtype=torch.float32, device=self.bos.device)
        B = cond.shape[0]
        if cond.ndim != 2 or cond.shape[1] != self.config.text_dim:
            raise ValueError(f"cond must be [B, {self.config.text_dim}], got {tuple(cond.shape)}")
        if not 1 <= n_frames <= self.config.max_frames:
            raise ValueError(f"n_frames must be in 1..{self.config.max_frames}, got {n_frames}")
        seeds = list(range(B)) if seeds is None else list(seeds)
        if len(seeds) != B:
            raise ValueError(f"got {len(seeds)} seeds for a batch of {B}")
        temperatures, top_ks = sampling_rows(temperature, top_k, B)

        device = self.bos.device
        uniforms = torch.from_numpy(np.stack([np.random.default_rng(int(s)).random(n_frames) for s in seeds])).to(
            device
        )
        temperatures, top_ks = temperatures.to(device), top_ks.clamp(max=self.config.vocab_size).to(device)
        tokens = torch.empty(B, n_frames, dtype=torch.long, device=device)
        logprobs = torch.empty(B, n_frames, dtype=torch.float32, device=device)
        cache = KVCache(self.config, B, n_frames, device, self.bos.dtype)
        cond_emb, bias = self.condition(cond)
        # What every position adds to its token's embedding, computed once for the whole clip: [B, T, d_model].
        offsets = cond_emb.unsqueeze(1) + self.pos_emb.weight[:n_frames]
        if self.config.bpm_bins:
            offsets = offsets + self._clock(self.expected_bpm(cond), torch.arange(n_frames, device=device))
        x = self.bos.expand(B, 1, -1) + offsets[:, :1]
        for t in range(n_frames):
            logits = self._step(x, cache, bias)
            tokens[:, t], logprobs[:, t] = draw(logits, temperatures, top_ks, uniforms[:, t])
            if t + 1 < n_frames:
                x = self.tok_emb(tokens[:, t : t + 1]) + offsets[:, t + 1 : t + 2]
        return tokens, logprobs


def sampling_rows(
    temperature: float | Sequence[float], top_k: int | Sequence[int], batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row temperatures [B] (float) and top-k [B] (long) from one value or one per row, checked."""

    def rows(value, name: str, kind) -> torch.Tensor:
        values = [kind(value)] * batch_size if np.isscalar(value) else [kind(v) for v in value]
        if len(values) != batch_size:
            raise ValueError(f"got {len(values)} values of {name} for a batch of {batch_size}")
        return torch.tensor(values, dtype=torch.float32 if kind is float else torch.long)

    temperatures, top_ks = rows(temperature, "temperature", float), rows(top_k, "top_k", int)
    if (temperatures <= 0).any():
        raise ValueError("temperature must be > 0")
    if (top_ks < 0).any():
        raise ValueError("top_k must be >= 0 (0 keeps the whole vocabulary)")
    return temperatures, top_ks


def filter_logits(logits: torch.Tensor, temperatures: torch.Tensor, top_ks: torch.Tensor) -> torch.Tensor:
    """Temperature-scale logits [B, V] and mask all but each row's top-k (k=0: no mask) to -inf."""
    scaled = logits.float() / temperatures.unsqueeze(-1)
    k_max = int(top_ks.max())
    if k_max == 0:
        return scaled
    kth = torch.topk(scaled, k_max, dim=-1).values.gather(-1, (top_ks - 1).clamp(min=0).unsqueeze(-1))
    kth = torch.where(top_ks.unsqueeze(-1) > 0, kth, torch.full_like(kth, -math.inf))
    return scaled.masked_fill(scaled < kth, -math.inf)


def draw(
    logits: torch.Tensor, temperatures: torch.Tensor, top_ks: torch.Tensor, uniforms: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse-CDF sampling with the caller's uniforms, so each row's randomness is its own."""
    logp = F.log_softmax(filter_logits(logits, temperatures, top_ks), dim=-1)
    cdf = logp.double().exp().cumsum(dim=-1)
    # right=True picks the first index whose CDF exceeds u: never a token of probability 0.
    index = torch.searchsorted(cdf, (uniforms * cdf[:, -1]).unsqueeze(-1), right=True).clamp(max=logits.shape[-1] - 1)
    return index.squeeze(-1), logp.gather(-1, index).squeeze(-1)


# ---------------------------------------------------------------------- checkpoints


def write_checkpoint(model: nn.Module, directory: str | Path, meta: dict | None = None) -> Path:
    """Write ``config.json`` (``model.config``), ``weights.pt`` (state dict) and ``meta.json`` into ``directory``.

    The format of every model built on :class:`GeneratorConfig` (the generator and the preference model).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(json.dumps(asdict(model.config), indent=2) + "\n")
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    torch.save(state, directory / WEIGHTS_FILE)
    (directory / META_FILE).write_text(json.dumps(meta or {}, indent=2, sort_keys=True) + "\n")
    return directory


def read_checkpoint(
    directory: str | Path, build, kind: str, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict]:
    """``build(config)`` loaded from a :func:`write_checkpoint` directory, in eval mode, and its meta."""
    directory = Path(directory)
    missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{directory} is not a {kind} checkpoint: missing {', '.join(missing)}")
    model = build(GeneratorConfig(**json.loads((directory / CONFIG_FILE).read_text())))
    model.load_state_dict(torch.load(directory / WEIGHTS_FILE, map_location="cpu", weights_only=True))
    meta_path = directory / META_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return model.to(device).eval(), meta


def save_generator(model: Generator, directory: str | Path, meta: dict | None = None) -> Path:
    return write_checkpoint(model, directory, meta)


def save_generator_atomic(
    model: Generator, directory: str | Path, meta: dict | None = None, extra_files: dict[str, str] | None = None
) -> Path:
    """:func:`save_generator` (plus ``extra_files``: name -> text) into a staging sibling renamed into place, so
    ``directory`` exists only complete: a reader never sees a half-written model, whatever kills the writer."""
    return write_atomic(lambda staging: save_generator(model, staging, meta), directory, extra_files)


def write_atomic(write, directory: str | Path, extra_files: dict[str, str] | None = None) -> Path:
    """``write(staging)`` (plus ``extra_files``: name -> text) into a staging sibling, then renamed to ``directory``."""
    directory = Path(directory)
    staging = directory.with_name(f".{directory.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    write(staging)
    for name, text in (extra_files or {}).items():
        (staging / name).write_text(text)
    shutil.rmtree(directory, ignore_errors=True)
    staging.rename(directory)
    return directory


def load_generator(directory: str | Path, device: str | torch.device = "cpu") -> tuple[Generator, dict]:
    """Load a checkpoint written by :func:`save_generator`; the model comes back in eval mode."""
    return read_checkpoint(directory, Generator, "generator", device)


# ---------------------------------------------------------------------- prompts to audio


@dataclass
class Generation:
    prompts: list[str]
    seeds: list[int]
    tokens: np.ndarray  # [B, T] int64
    logprobs: np.ndarray  # [B, T] float32
    audio: np.ndarray  # [B, samples] float32 in [-1, 1]
    sample_rate: int


def generate(
    model: Generator,
    text_encoder,
    prompts: Sequence[str],
    duration_s: float = 10.0,
    temperature: float = 0.99,
    top_k: int = 0,
    seeds: Sequence[int] | None = None,
) -> Generation:
    """Embed the prompts with the frozen text encoder, sample tokens and decode them to audio."""
    prompts = list(prompts)
    seeds = list(range(len(prompts))) if seeds is None else [int(s) for s in seeds]
    cond = torch.from_numpy(np.asarray(text_encoder.embed(prompts), dtype=np.float32))
    tokens, logprobs = model.sample(cond, codec.frames_for(duration_s), temperature, top_k, seeds)
    tokens_np = tokens.cpu().numpy()
    audio = np.stack([codec.decode(row) for row in tokens_np])
    return Generation(prompts, seeds, tokens_np, logprobs.cpu().numpy(), audio, codec.SAMPLE_RATE)
