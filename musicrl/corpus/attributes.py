"""The attribute space of the procedural corpus and how a consistent attribute set is drawn."""

from __future__ import annotations

import hashlib
import random
from dataclasses import asdict, dataclass, replace

from musicrl.audio.codec import FAMILIES

GENRES = ("classical", "jazz", "folk", "ambient", "electronic", "pop", "cinematic", "lullaby")
MOODS = ("happy", "sad", "calm", "energetic", "mysterious", "triumphant", "playful")
MODES = ("major", "minor")
REGISTERS = ("low", "middle", "high")
DYNAMICS = ("soft", "loud", "varied")
TEXTURES = ("legato", "staccato", "sparse")
PITCH_CLASSES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")

GENRE_INSTRUMENTS = {
    "classical": ("piano", "strings", "flute"),
    "jazz": ("piano", "brass", "guitar"),
    "folk": ("guitar", "flute", "strings"),
    "ambient": ("synth", "organ", "bells", "strings"),
    "electronic": ("synth", "bells"),
    "pop": ("piano", "guitar", "synth"),
    "cinematic": ("strings", "brass"),
    "lullaby": ("bells", "piano", "flute"),
}
# Probability of the major mode given the mood; the rest is minor.
MOOD_MAJOR = {
    "happy": 0.95,
    "sad": 0.05,
    "calm": 0.6,
    "energetic": 0.6,
    "mysterious": 0.1,
    "triumphant": 0.95,
    "playful": 0.9,
}
MOOD_BPM = {
    "happy": (100, 140),
    "sad": (56, 84),
    "calm": (56, 90),
    "energetic": (120, 160),
    "mysterious": (60, 96),
    "triumphant": (90, 130),
    "playful": (110, 150),
}
SLOW_BELOW, FAST_ABOVE = 80, 115  # BPM thresholds of the tempo words
TEMPO_BPM = {"slow": (56, SLOW_BELOW - 1), "moderate": (SLOW_BELOW, FAST_ABOVE), "fast": (FAST_ABOVE + 1, 160)}
TEMPOS = tuple(TEMPO_BPM)
BPM_BIN_WIDTH = 5
BPM_BINS = tuple((low, min(low + BPM_BIN_WIDTH - 1, 160)) for low in range(56, 161, BPM_BIN_WIDTH))  # 56-60 .. 156-160
BPM_BIN_CENTRES = tuple((low + high) / 2 for low, high in BPM_BINS)
# Categorical attributes a model may be taught to read off a caption (the generator's attribute head).
LABELLED_ATTRIBUTES = {
    "mode": MODES,
    "tempo": TEMPOS,
    "tonic": PITCH_CLASSES,
    "key": tuple(f"{tonic} {mode}" for mode in MODES for tonic in PITCH_CLASSES),
    "bpm": tuple(f"{low}-{high}" for low, high in BPM_BINS),
}
# Attributes whose words move a caption's sentence embedding least (cosine ~0.98 when swapped):
# the generator learns to follow them from counterfactual captions (corpus.counterfactual_captions).
COUNTERFACTUAL_ATTRIBUTES = ("mode", "tempo")


@dataclass(frozen=True)
class Attributes:
    genre: str
    mood: str
    bpm: int
    instruments: tuple[str, ...]  # one or two families, alternating by phrase
    tonic: str  # pitch class name
    mode: str
    register: str
    dynamics: str
    texture: str

    @property
    def tempo(self) -> str:
        return "slow" if self.bpm < SLOW_BELOW else "fast" if self.bpm > FAST_ABOVE else "moderate"

    @property
    def key(self) -> str:
        return f"{self.tonic} {self.mode}"

    def to_dict(self) -> dict:
        return asdict(self) | {"instruments": list(self.instruments), "tempo": self.tempo, "key": self.key}

    def split_hash(self) -> float:
        """A number in [0, 1) fixed by the attribute set: splits are disjoint in attribute sets."""
        text = "|".join(str(v) for v in asdict(self).values())
        return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") / 2**64


def sample_attributes(rng: random.Random) -> Attributes:
    genre = rng.choice(GENRES)
    mood = rng.choice(MOODS)
    if genre == "lullaby" and mood in ("energetic", "triumphant"):
        mood = "calm"
    low, high = MOOD_BPM[mood]
    pool = GENRE_INSTRUMENTS[genre] if rng.random() < 0.8 else FAMILIES
    instruments = tuple(rng.sample(pool, 2 if rng.random() < 0.25 and len(pool) > 1 else 1))
    return Attributes(
        genre=genre,
        mood=mood,
        bpm=rng.randint(low, high),
        instruments=instruments,
        tonic=rng.choice(PITCH_CLASSES),
        mode="major" if rng.random() < MOOD_MAJOR[mood] else "minor",
        register=rng.choice(REGISTERS),
        dynamics="soft" if genre == "lullaby" and rng.random() < 0.7 else rng.choice(DYNAMICS),
        texture=rng.choice(TEXTURES),
    )


def change_attribute(attributes: Attributes, name: str, rng: random.Random) -> Attributes:
    """The same attribute set with `name` changed: the other mode, or a BPM in another tempo bucket."""
    if name == "mode":
        return replace(attributes, mode="minor" if attributes.mode == "major" else "major")
    if name == "tempo":
        low, high = TEMPO_BPM[rng.choice([t for t in TEMPO_BPM if t != attributes.tempo])]
        return replace(attributes, bpm=rng.randint(low, high))
    raise ValueError(f"no counterfactual for attribute {name!r}; choose from {COUNTERFACTUAL_ATTRIBUTES}")


def attribute_labels(attributes: Attributes | dict, names: tuple[str, ...]) -> list[int]:
    """Index of each named attribute's value in ``LABELLED_ATTRIBUTES`` (an Attributes or its ``to_dict()``)."""
    unknown = set(names) - set(LABELLED_ATTRIBUTES)
    if unknown:
        raise ValueError(f"no labels for {sorted(unknown)}; choose from {sorted(LABELLED_ATTRIBUTES)}")
    values = attributes if isinstance(attributes, dict) else attributes.to_dict()
    return [
        (values["bpm"] - BPM_BINS[0][0]) // BPM_BIN_WIDTH
        if name == "bpm"
        else LABELLED_ATTRIBUTES[name].index(values[name])
        for name in names
    ]
