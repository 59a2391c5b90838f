"""The attribute space of the procedural corpus and how a consistent attribute set is drawn."""

from __future__ import annotations

import hashlib
import random
from dataclasses import asdict, dataclass

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
MOOD_MAJOR = {"happy": 0.95, "sad": 0.05, "calm": 0.6, "energetic": 0.6, "mysterious": 0.1, "triumphant": 0.95, "playful": 0.9}
MOOD_BPM = {
    "happy": (100, 140), "sad": (56, 84), "calm": (56, 90), "energetic": (120, 160),
    "mysterious": (60, 96), "triumphant": (90, 130), "playful": (110, 150),
}
SLOW_BELOW, FAST_ABOVE = 80, 115  # BPM thresholds of the tempo words


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
