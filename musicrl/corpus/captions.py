"""Captions from attributes: several phrasings of the same attribute set."""

from __future__ import annotations

import random

from musicrl.corpus.attributes import Attributes

GENRE_NOUNS = {
    "classical": ("classical piece", "classical melody", "chamber piece"),
    "jazz": ("jazz tune", "jazz line", "jazz melody"),
    "folk": ("folk melody", "folk tune", "folk song"),
    "ambient": ("ambient piece", "ambient soundscape", "ambient drone melody"),
    "electronic": ("electronic track", "electronic melody", "synth-pop line"),
    "pop": ("pop melody", "pop tune", "pop hook"),
    "cinematic": ("cinematic theme", "film score cue", "cinematic melody"),
    "lullaby": ("lullaby", "cradle song", "bedtime melody"),
}
MOOD_WORDS = {
    "happy": ("happy", "joyful", "cheerful"),
    "sad": ("sad", "sorrowful", "melancholic"),
    "calm": ("calm", "peaceful", "relaxed"),
    "energetic": ("energetic", "driving", "lively"),
    "mysterious": ("mysterious", "dark", "eerie"),
    "triumphant": ("triumphant", "heroic", "majestic"),
    "playful": ("playful", "whimsical", "bouncy"),
}
INSTRUMENT_WORDS = {
    "piano": ("piano", "grand piano", "solo piano"),
    "strings": ("strings", "string section", "violins"),
    "brass": ("brass", "horns", "trumpets"),
    "flute": ("flute", "woodwinds", "solo flute"),
    "guitar": ("guitar", "acoustic guitar", "plucked guitar"),
    "organ": ("organ", "electric organ", "church organ"),
    "synth": ("synth lead", "synthesizer", "analog synth"),
    "bells": ("bells", "glockenspiel", "music box"),
}
TEMPO_WORDS = {
    "slow": ("slow", "unhurried", "slow-paced"),
    "moderate": ("mid-tempo", "moderate", "steady"),
    "fast": ("fast", "quick", "up-tempo"),
}
REGISTER_WORDS = {
    "low": ("low", "deep", "bass"),
    "middle": ("mid-range", "middle", "central"),
    "high": ("high", "upper", "bright high"),
}
DYNAMICS_WORDS = {
    "soft": ("soft", "gentle", "quiet"),
    "loud": ("loud", "powerful", "bold"),
    "varied": ("dynamic", "with changing dynamics", "alternating soft and loud"),
}
TEXTURE_WORDS = {
    "legato": ("smooth legato", "flowing", "sustained"),
    "staccato": ("staccato", "detached", "short, plucky"),
    "sparse": ("sparse", "minimal", "airy, with long pauses"),
}


def _instruments(attributes: Attributes, rng: random.Random) -> str:
    names = [rng.choice(INSTRUMENT_WORDS[i]) for i in attributes.instruments]
    return " and ".join(names)


def _key(attributes: Attributes, rng: random.Random) -> str:
    return rng.choice(
        (
            f"in {attributes.tonic} {attributes.mode}",
            f"in a {attributes.mode} key",
            f"in the key of {attributes.tonic} {attributes.mode}",
        )
    )


def _tempo(attributes: Attributes, rng: random.Random) -> str:
    return rng.choice(
        (
            rng.choice(TEMPO_WORDS[attributes.tempo]),
            f"{attributes.bpm} BPM",
            f"{rng.choice(TEMPO_WORDS[attributes.tempo])} ({attributes.bpm} bpm)",
        )
    )


def caption(attributes: Attributes, rng: random.Random) -> str:
    """One caption for the attribute set, in one of several phrasings."""
    a = attributes
    mood = rng.choice(MOOD_WORDS[a.mood])
    genre = rng.choice(GENRE_NOUNS[a.genre])
    instruments = _instruments(a, rng)
    tempo = _tempo(a, rng)
    key = _key(a, rng)
    register = rng.choice(REGISTER_WORDS[a.register])
    dynamics = rng.choice(DYNAMICS_WORDS[a.dynamics])
    texture = rng.choice(TEXTURE_WORDS[a.texture])
    phrasings = (
        f"a {tempo}, {mood} {instruments} {genre} {key}, {texture} and {dynamics}, in a {register} register",
        (
            f"{mood.capitalize()} {genre} played on {instruments}: {tempo}, {key}, {register} register, "
            f"{dynamics}, {texture}."
        ),
        (
            f"{a.genre}; {a.mood}; {a.bpm} bpm; {', '.join(a.instruments)}; {a.tonic} {a.mode}; {a.register}; "
            f"{a.dynamics}; {a.texture}"
        ),
        f"{texture.capitalize()} {dynamics} {instruments} in a {register} register, a {mood} {genre} {key} at {tempo}",
        (
            f"I want a {mood} {genre} with {instruments}, {tempo}, {key}. "
            f"Keep it {dynamics}, {texture}, in the {register} register."
        ),
    )
    return rng.choice(phrasings)
