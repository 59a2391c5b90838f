import random

import numpy as np
import pytest

from musicrl.audio import codec
from musicrl.corpus import SPLITS, make_corpus, make_record, sample_attributes, split_of
from musicrl.corpus.attributes import PITCH_CLASSES, Attributes
from musicrl.corpus.composer import REGISTER_RANGES, SCALES, compose

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
    base = dict(
        genre="classical",
        mood="calm",
        bpm=100,
        instruments=("piano",),
        tonic="A",
        mode="minor",
        register="middle",
        dynamics="loud",
        texture="legato",
    )
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


@pytest.mark.parametrize("duration_s", [10.0, 30.0])
def test_counterfactual_captions_change_one_attribute_and_keep_the_phrasing(duration_s):
    from musicrl.corpus import COUNTERFACTUAL_ATTRIBUTES, counterfactual_captions

    for index in range(40):
        record = make_record(index, seed=2, split="train", duration_s=duration_s, n_captions=2)
        changed, variants = counterfactual_captions(index, seed=2, split="train", duration_s=duration_s, n_captions=2)
        assert (
            changed["mode"].mode != record.attributes["mode"] and changed["tempo"].tempo != record.attributes["tempo"]
        )
        assert len(variants) == 2 and all(set(v) == set(COUNTERFACTUAL_ATTRIBUTES) for v in variants)
        mode, other_mode = record.attributes["mode"], "minor" if record.attributes["mode"] == "major" else "major"
        for original, changed in zip([record.caption, *record.extra_captions], variants, strict=True):
            # the mode counterfactual is the caption with the mode word swapped, nothing else
            assert changed["mode"] == original.replace(mode, other_mode)
            # the tempo counterfactual differs only where the tempo is stated (a tempo word or the BPM)
            assert changed["tempo"] != original
            assert _without_tempo(changed["tempo"]) == _without_tempo(original)


def _without_tempo(text: str) -> str:
    import re

    from musicrl.corpus.captions import TEMPO_WORDS

    for word in sorted((w for words in TEMPO_WORDS.values() for w in words), key=len, reverse=True):
        text = text.replace(word, "<tempo>")
    return re.sub(r"\d+", "<bpm>", text)


def test_changed_tempo_is_in_another_bucket():
    from musicrl.corpus import change_attribute

    rng = random.Random(0)
    for _ in range(200):
        attributes = sample_attributes(rng)
        changed = change_attribute(attributes, "tempo", rng)
        assert changed.tempo != attributes.tempo
        assert changed.mode == attributes.mode and changed.instruments == attributes.instruments
    with pytest.raises(ValueError, match="no counterfactual"):
        change_attribute(attributes, "genre", rng)
    from musicrl.corpus import counterfactual_captions

    with pytest.raises(ValueError, match="no counterfactual"):
        counterfactual_captions(0, attributes=("mode", "genre"))
