"""Simulated listeners: people who hear two clips and (sometimes) say which one they prefer.

A listener's taste is a hidden function of what it *hears*: a few perceptual features
computed from the waveform (brightness, pitch register, tempo, loudness, noisiness,
dynamics), never from tokens, captions or anything the training side can see. Only the
load tests, the closed-loop experiment and the tests may import this module; training
learns the taste only through the votes that reach Kafka.

A vote follows the pairwise protocol of the MusicRL paper:

1. the listener plays clip A, then clip B, each for a random share of its length
   (sometimes not at all: then there is nothing to compare and no vote);
2. it judges only what it heard, so the features are computed on the heard prefix;
3. it often does not vote at all (abstention), declares a tie more often when the
   two clips please it about equally, and otherwise chooses by a Bradley-Terry draw:
   ``P(A) = sigmoid((u(A) - u(B)) / temperature)``.

Individual tastes are drawn around a population mean, so the population agrees on
average (the signal a reward model can learn) while two individuals agree on only about
60-65 percent of pairs (the paper measured 60 percent for real raters).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy.signal import stft

SAMPLE_RATE = 16_000

FEATURES: tuple[str, ...] = ("brightness", "pitch", "tempo", "loudness", "noisiness", "dynamics")

Choice = Literal["a", "b", "tie", "none"]

_SILENCE_RMS = 1e-4
_FRAME = 1024
_HOP = 512


# --------------------------------------------------------------------------- hearing


def hear(wave: np.ndarray, sample_rate: int = SAMPLE_RATE) -> dict[str, float]:
    """Perceptual features of a mono waveform, each mostly within -3..2.

    - ``brightness``: log2 of the energy-weighted spectral centroid over 1 kHz;
    - ``pitch``: register, log2 of the median dominant partial over A4 (440 Hz);
    - ``tempo``: log2 of onsets per second over 2 (peaks of the spectral flux in dB);
    - ``loudness``: RMS level in dBFS, (dB + 20) / 10;
    - ``noisiness``: log10 of the mean spectral flatness, shifted so tonal music is near 0;
    - ``dynamics``: standard deviation of the frame level in dB over 6, minus 1.

    Silence (or a clip too short to analyse) gets neutral zero features.
    """
    wave = np.asarray(wave, dtype=np.float64).reshape(-1)
    if wave.size < _FRAME * 2 or not np.all(np.isfinite(wave)):
        return dict.fromkeys(FEATURES, 0.0)
    rms = float(np.sqrt(np.mean(wave**2)))
    if rms < _SILENCE_RMS:
        return dict.fromkeys(FEATURES, 0.0)

    freqs, _, spec = stft(wave, fs=sample_rate, nperseg=_FRAME, noverlap=_FRAME - _HOP, boundary=None)
    magnitude = np.abs(spec)  # [F, T]
    power = magnitude**2
    frame_power = power.sum(axis=0)
    voiced = frame_power > (_SILENCE_RMS**2) * _FRAME
    if not voiced.any():
        return dict.fromkeys(FEATURES, 0.0)

    weights = frame_power[voiced] / frame_power[voiced].sum()
    centroids = (freqs[:, None] * power[:, voiced]).sum(axis=0) / frame_power[voiced]
    brightness = math.log2(max(float((centroids * weights).sum()), 20.0) / 1000.0)

    band = (freqs >= 50.0) & (freqs <= 4000.0)
    dominant = freqs[band][np.argmax(magnitude[band][:, voiced], axis=0)]
    pitch = math.log2(max(float(np.median(dominant)), 20.0) / 440.0)

    level_db = 20.0 * np.log10(magnitude + 1e-10)
    level_db = np.maximum(level_db, level_db.max() - 60.0)
    onsets = _count_peaks(np.maximum(np.diff(level_db, axis=1), 0.0).mean(axis=0))
    seconds = wave.size / sample_rate
    tempo = math.log2(max(onsets / seconds, 0.25) / 2.0)

    loudness = (20.0 * math.log10(rms) + 20.0) / 10.0

    eps = 1e-12
    flatness = np.exp(np.mean(np.log(power[:, voiced] + eps), axis=0)) / (np.mean(power[:, voiced], axis=0) + eps)
    noisiness = math.log10(float(np.mean(flatness)) + 1e-6) + 2.0

    frame_db = 10.0 * np.log10(frame_power[voiced] / _FRAME + eps)
    dynamics = float(np.std(frame_db)) / 6.0 - 1.0

    return {
        "brightness": brightness,
        "pitch": pitch,
        "tempo": tempo,
        "loudness": loudness,
        "noisiness": noisiness,
        "dynamics": dynamics,
    }


def _count_peaks(flux: np.ndarray) -> int:
    """Onsets = local maxima of the spectral flux well above its typical level.

    The threshold adapts to the clip (median + 3 MAD) and to its strongest onset (a fifth
    of the way up), so decaying partials and steady noise do not count as new notes.
    """
    if flux.size < 3:
        return 0
    median = float(np.median(flux))
    mad = float(np.median(np.abs(flux - median)))
    threshold = max(median + 3.0 * mad, median + 0.2 * (float(flux.max()) - median))
    peaks = (flux[1:-1] > flux[:-2]) & (flux[1:-1] >= flux[2:]) & (flux[1:-1] > threshold)
    return int(peaks.sum())


# --------------------------------------------------------------------------- taste


class FeatureTaste(BaseModel):
    """One term of a taste: ``weight * x - curvature * (x - ideal) ** 2``."""

    model_config = ConfigDict(frozen=True)

    weight: float = 0.0
    ideal: float = 0.0
    curvature: float = Field(default=0.0, ge=0.0)


def _default_taste() -> dict[str, FeatureTaste]:
    # The hidden population taste: livelier tempo, a bright upper-middle register,
    # clean (not noisy) sound at a comfortable level with some dynamic life.
    return {
        "brightness": FeatureTaste(weight=0.5),
        "pitch": FeatureTaste(ideal=0.5, curvature=0.6),
        "tempo": FeatureTaste(weight=1.0),
        "loudness": FeatureTaste(ideal=0.0, curvature=0.3),
        "noisiness": FeatureTaste(weight=-0.8),
        "dynamics": FeatureTaste(weight=0.2),
    }


def _opposite_taste() -> dict[str, FeatureTaste]:
    # A population with the opposite taste: slow, dark, sparse music in a low register,
    # a little quieter; noise is still disliked and some dynamic life still liked.
    return {
        "brightness": FeatureTaste(weight=-0.5),
        "pitch": FeatureTaste(ideal=-0.5, curvature=0.6),
        "tempo": FeatureTaste(weight=-1.0),
        "loudness": FeatureTaste(ideal=-0.3, curvature=0.3),
        "noisiness": FeatureTaste(weight=-0.8),
        "dynamics": FeatureTaste(weight=0.2),
    }


# Named population tastes (``ListenerConfig.for_taste``): each a factory of a fresh taste dict.
TASTES = {"default": _default_taste, "opposite": _opposite_taste}


class ListenerConfig(BaseModel):
    """Parameters of a listener population (all probabilities are per vote)."""

    model_config = ConfigDict(frozen=True)

    size: int = Field(default=200, ge=1, description="number of individuals")
    taste: dict[str, FeatureTaste] = Field(default_factory=_default_taste, description="population mean taste")
    taste_spread: float = Field(default=1.2, ge=0.0, description="individual deviation from the mean taste")
    temperature: float = Field(default=0.6, gt=0.0, description="Bradley-Terry noise: higher = more random choices")
    tie_probability: float = Field(default=0.3, ge=0.0, le=1.0, description="P(tie) when both clips please equally")
    tie_width: float = Field(default=1.0, gt=0.0, description="utility gap over which ties fade out")
    abstain_probability: float = Field(default=0.5, ge=0.0, le=1.0, description="P(no vote) after listening")
    skip_probability: float = Field(default=0.08, ge=0.0, le=1.0, description="P(clip B is never played)")
    listen_share_alpha: float = Field(default=2.5, gt=0.0, description="Beta(alpha, beta) share of a clip played")
    listen_share_beta: float = Field(default=1.2, gt=0.0)
    min_listen_s: float = Field(default=1.5, ge=0.0, description="nobody judges less than this")

    def model_post_init(self, _context: object) -> None:
        unknown = set(self.taste) - set(FEATURES)
        if unknown:
            raise ValueError(f"unknown taste features {sorted(unknown)}; known: {list(FEATURES)}")

    @classmethod
    def for_taste(cls, name: str, **kwargs: object) -> ListenerConfig:
        """A population with the named taste preset (``TASTES``); other fields from ``kwargs``."""
        if name not in TASTES:
            raise ValueError(f"unknown taste preset {name!r}; known: {', '.join(sorted(TASTES))}")
        return cls(taste=TASTES[name](), **kwargs)


@dataclass(frozen=True)
class Vote:
    choice: Choice
    listen_a_s: float
    listen_b_s: float


class Listener:
    """One simulated person: a private taste plus the population's listening habits."""

    def __init__(self, listener_id: str, taste: dict[str, FeatureTaste], config: ListenerConfig):
        self.id = listener_id
        self._taste = taste
        self._config = config

    def utility(self, wave: np.ndarray, sample_rate: int = SAMPLE_RATE) -> float:
        return self.utility_of(hear(wave, sample_rate))

    def utility_of(self, features: dict[str, float]) -> float:
        return float(
            sum(
                term.weight * features[name] - term.curvature * (features[name] - term.ideal) ** 2
                for name, term in self._taste.items()
            )
        )

    def outcome_probabilities(self, utility_a: float, utility_b: float) -> dict[str, float]:
        """P(a), P(b), P(tie) of a listener who listened to both clips and votes."""
        gap = utility_a - utility_b
        p_tie = self._config.tie_probability * math.exp(-((gap / self._config.tie_width) ** 2))
        p_a = 1.0 / (1.0 + math.exp(-gap / self._config.temperature))
        return {"a": (1.0 - p_tie) * p_a, "b": (1.0 - p_tie) * (1.0 - p_a), "tie": p_tie}

    def judge(
        self, wave_a: np.ndarray, wave_b: np.ndarray, rng: np.random.Generator, sample_rate: int = SAMPLE_RATE
    ) -> Vote:
        config = self._config
        listen_a = self._listening_time(len(wave_a) / sample_rate, rng)
        skipped_b = rng.random() < config.skip_probability
        listen_b = 0.0 if skipped_b else self._listening_time(len(wave_b) / sample_rate, rng)
        abstains = rng.random() < config.abstain_probability
        draw = rng.random()
        if skipped_b or abstains:
            return Vote("none", listen_a, listen_b)
        heard_a = wave_a[: int(listen_a * sample_rate)]
        heard_b = wave_b[: int(listen_b * sample_rate)]
        probabilities = self.outcome_probabilities(
            self.utility(heard_a, sample_rate), self.utility(heard_b, sample_rate)
        )
        if draw < probabilities["tie"]:
            choice: Choice = "tie"
        elif draw < probabilities["tie"] + probabilities["a"]:
            choice = "a"
        else:
            choice = "b"
        return Vote(choice, listen_a, listen_b)

    def _listening_time(self, duration_s: float, rng: np.random.Generator) -> float:
        share = rng.beta(self._config.listen_share_alpha, self._config.listen_share_beta)
        seconds = max(share * duration_s, min(self._config.min_listen_s, duration_s))
        return round(float(seconds), 3)

    def __repr__(self) -> str:
        return f"Listener({self.id!r})"


class Population:
    """A seeded population of listeners with individual tastes around a common mean.

    ``Population(config, seed).held_out()`` has the same taste distribution but other
    individuals (a disjoint random stream and other ids): the judges of an evaluation
    who never fed the training.
    """

    def __init__(self, config: ListenerConfig | None = None, seed: int = 0, *, held_out: bool = False):
        self.config = config or ListenerConfig()
        self.seed = seed
        self.is_held_out = held_out
        self.name = "heldout" if held_out else "listener"
        # Separate random streams: no held-out individual is a training individual.
        rng = np.random.default_rng(np.random.SeedSequence([seed, int(held_out)]))
        self.listeners = [
            Listener(f"{self.name}-{seed}-{index:05d}", self._draw_taste(rng), self.config)
            for index in range(self.config.size)
        ]

    def held_out(self) -> Population:
        return Population(self.config, self.seed, held_out=True)

    def _draw_taste(self, rng: np.random.Generator) -> dict[str, FeatureTaste]:
        spread = self.config.taste_spread
        taste = {}
        for name in FEATURES:
            mean = self.config.taste.get(name, FeatureTaste())
            # Deviations scale with how much the feature matters, plus a floor so that
            # individuals may care about features the population as a whole ignores.
            weight = mean.weight + spread * (abs(mean.weight) + 0.25) * rng.standard_normal()
            ideal = mean.ideal + spread * 0.5 * rng.standard_normal()
            curvature = max(0.0, mean.curvature * (1.0 + spread * 0.5 * rng.standard_normal()))
            taste[name] = FeatureTaste(weight=weight, ideal=ideal, curvature=curvature)
        return taste

    def mean_listener(self) -> Listener:
        """The population's average taste (for analysis only: nobody votes with it)."""
        taste = {name: self.config.taste.get(name, FeatureTaste()) for name in FEATURES}
        return Listener(f"{self.name}-{self.seed}-mean", taste, self.config)

    def sample(self, rng: np.random.Generator) -> Listener:
        return self.listeners[int(rng.integers(len(self.listeners)))]

    def __len__(self) -> int:
        return len(self.listeners)

    def __iter__(self):
        return iter(self.listeners)

    def __getitem__(self, index: int) -> Listener:
        return self.listeners[index]


def expected_agreement(
    population: Population, clip_features: list[dict[str, float]], n_samples: int, rng: np.random.Generator
) -> float:
    """Probability that two random listeners who both pick a side on a random pair pick the same.

    Computed from the vote probabilities on full listens (no sampling noise from the
    votes themselves), averaged over random pairs of distinct clips and of distinct listeners.
    """
    if len(clip_features) < 2 or len(population) < 2:
        raise ValueError("need at least two clips and two listeners")
    agree = decisive = 0.0
    for _ in range(n_samples):
        i, j = rng.choice(len(clip_features), size=2, replace=False)
        first, second = rng.choice(len(population), size=2, replace=False)
        p = [
            population[k].outcome_probabilities(
                population[k].utility_of(clip_features[i]), population[k].utility_of(clip_features[j])
            )
            for k in (first, second)
        ]
        both_decide = (p[0]["a"] + p[0]["b"]) * (p[1]["a"] + p[1]["b"])
        agree += p[0]["a"] * p[1]["a"] + p[0]["b"] * p[1]["b"]
        decisive += both_decide
    return agree / decisive
