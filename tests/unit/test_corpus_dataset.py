import random

import numpy as np
import pytest

from musicrl.audio import codec
from musicrl.corpus import SPLITS, make_corpus, make_record, sample_attributes, split_of
from musicrl.corpus.attributes import Attributes
from musicrl.corpus.composer import REGISTER_RANGES, SCALES, compose
from musicrl.corpus.attributes import PITCH_CLASSES

pytestmark = pytest.mark.unit


def test_corpus_is_deterministic_and_any_size():
    first = make_corpus(20, seed=3, split="train", duration_s=7.5)
    again = make_corpus(20, seed=3, split="train", duration_s=7.5)
    assert [r.caption for r in first] == [r.caption for r in again]
    assert all(np.array_equal(a.tokens, b.tokens) for a, b in zip(first, again))
    assert all(len(r.tokens) == codec.frames_for(7.5) for r in first)
    assert make_record(5, seed=3).caption == make_corpus(1, seed=3, start=5)[0].caption
    other = make_corpus(20, seed=4, split="train")
    assert [r.caption for r in first] != [r.caption for r in other]


def test_splits_are_disjoint_in_attribute_sets():
    keys = {}
    for split in SPLITS:
        records = make_corpus(150, seed=0, split=split)
        keys[split] = {tuple(sorted((k, str(v)) for k, v in r.attributes.items())) for r in records}
        assert all(r.split == split for r in records)
    assert not keys["train"] & keys["test"]
    assert not keys["train"] & keys["valid"]
    assert not keys["valid"] & keys["test"]


def test_split_shares_follow_the_hash():
    rng = random.Random(0)
    splits = [split_of(sample_attributes(rng)) for _ in range(4000)]
    assert 0.85 < splits.count("train") / len(splits) < 0.95


def test_unknown_split_and_negative_size_are_rejected():
    with pytest.raises(ValueError, match="unknown split"):
        make_corpus(1, split="dev")
    with pytest.raises(ValueError):
        make_corpus(-1)


def _attrs(**overrides) -> Attributes:
    base = dict(genre="classical", mood="calm", bpm=100, instruments=("piano",), tonic="A", mode="minor",
                register="middle", dynamics="loud", texture="legato")
    return Attributes(**(base | overrides))


def _notes(tokens):
    return [codec.token_note(t) for t in tokens if codec.is_note(t)]


def test_tokens_follow_instrument_register_mode_and_dynamics():
    attributes = _attrs()
    tokens, _ = compose(attributes, 400, random.Random(1))
    notes = _notes(tokens)
    low, high = REGISTER_RANGES["middle"]
    scale = {(PITCH_CLASSES.index("A") + d) % 12 for d in SCALES["minor"]}
    assert {n.family_name for n in notes} == {"piano"}
    assert all(low <= n.pitch <= high and n.pitch % 12 in scale for n in notes)
    assert all(n.velocity == 1 for n in notes)
    soft, _ = compose(_attrs(dynamics="soft"), 200, random.Random(1))
    assert all(n.velocity == 0 for n in _notes(soft))


def test_tempo_sets_the_onset_rate_and_texture_the_rests():
    def onsets(bpm):
        rng = random.Random(2)
        return np.mean([len(_notes(compose(_attrs(bpm=bpm), 400, rng)[0])) for _ in range(10)])

    assert onsets(150) > 1.5 * onsets(60)

    def rests(texture):
        rng = random.Random(2)
        return np.mean([compose(_attrs(texture=texture), 400, rng)[0].count(codec.REST) for _ in range(10)])

    assert rests("sparse") > rests("legato") and rests("staccato") > rests("legato")


def test_glitches_are_rare_and_counted():
    records = make_corpus(300, seed=1)
    glitched = [r for r in records if r.glitches]
    assert 0.03 < len(glitched) / len(records) < 0.2
    for r in glitched:
        assert np.isin(r.tokens, codec.GLITCH_TOKENS).sum() == r.glitches
    assert all(not np.isin(r.tokens, codec.GLITCH_TOKENS).any() for r in records if not r.glitches)


def test_captions_vary_for_one_attribute_set():
    record = make_record(0, seed=0, n_captions=6)
    assert len({record.caption, *record.extra_captions}) > 2
