"""Procedural music corpus: captions from an attribute grammar paired with composed token sequences.

from musicrl.corpus import make_corpus
records = make_corpus(1000, seed=0, split="train")   # .caption .attributes .tokens .render()
"""

from musicrl.corpus.attributes import (
    COUNTERFACTUAL_ATTRIBUTES,
    DYNAMICS,
    GENRES,
    LABELLED_ATTRIBUTES,
    MODES,
    MOODS,
    REGISTERS,
    TEXTURES,
    Attributes,
    attribute_labels,
    change_attribute,
    sample_attributes,
)
from musicrl.corpus.dataset import SPLITS, Record, counterfactual_captions, make_corpus, make_record, split_of

__all__ = [
    "COUNTERFACTUAL_ATTRIBUTES",
    "DYNAMICS",
    "GENRES",
    "LABELLED_ATTRIBUTES",
    "MODES",
    "MOODS",
    "REGISTERS",
    "SPLITS",
    "TEXTURES",
    "Attributes",
    "Record",
    "attribute_labels",
    "change_attribute",
    "counterfactual_captions",
    "make_corpus",
    "make_record",
    "sample_attributes",
    "split_of",
]
