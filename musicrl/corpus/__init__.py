"""Procedural music corpus: captions from an attribute grammar paired with composed token sequences.

    from musicrl.corpus import make_corpus
    records = make_corpus(1000, seed=0, split="train")   # .caption .attributes .tokens .render()
"""

from musicrl.corpus.attributes import (
    DYNAMICS, GENRES, MODES, MOODS, REGISTERS, TEXTURES, Attributes, sample_attributes,
)
from musicrl.corpus.dataset import SPLITS, Record, make_corpus, make_record, split_of

__all__ = [
    "DYNAMICS", "GENRES", "MODES", "MOODS", "REGISTERS", "SPLITS", "TEXTURES", "Attributes", "Record",
    "make_corpus", "make_record", "sample_attributes", "split_of",
]
