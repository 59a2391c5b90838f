"""process_chunk: one outcome per message (dead letter, duplicate, filtered, accepted), deterministic."""

from __future__ import annotations

import base64
import json

import pytest
from feedback_helpers import hex_id, make_event, make_record

from feedback_consumer.processing import GenerationLookupError, Message, process_chunk

pytestmark = pytest.mark.unit


def lookup_from(*records):
    table = {r.generation_id: r for r in records}
    return lambda ids: {gid: table.get(gid) for gid in ids}


def message(offset, event=None, value=None, key=None, partition=0):
    if event is not None:
        value = event.to_bytes()
        key = event.generation_id.encode() if key is None else key
    return Message(partition, offset, key, value)


def test_valid_events_become_rows_joined_with_their_generation():
    record = make_record(policy_versions=("3", "3"), duration_s=10.0)
    events = [make_event(record, choice="a"), make_event(record, choice="tie", listen=(6.0, 12.0))]
    outcome = process_chunk([message(i, e) for i, e in enumerate(events)], set(), lookup_from(record), 0.5)
    assert [r["event_id"] for r in outcome.rows] == [e.event_id for e in events]
    first, tie = outcome.rows
    assert first["policy_version"] == "3" and not first["mixed_policy"] and not first["is_tie"]
    assert first["tokens_a"] == record.clips[0].tokens and first["logprobs_b"] == record.clips[1].logprobs
    assert first["prompt"] == "calm piano" and first["kafka_offset"] == 0
    assert tie["is_tie"] and tie["listen_a_frac"] == pytest.approx(0.6) and tie["listen_b_frac"] == 1.0
    assert outcome.new_event_ids == [e.event_id for e in events]
    assert outcome.dead_letters == [] and outcome.duplicates == 0


def test_pair_from_two_policies_is_tagged_with_the_newer_one():
    record = make_record(policy_versions=("9", "10"))
    outcome = process_chunk([message(0, make_event(record))], set(), lookup_from(record), 0.0)
    row = outcome.rows[0]
    assert row["policy_version"] == "10" and row["mixed_policy"]
    assert (row["policy_version_a"], row["policy_version_b"]) == ("9", "10")


def test_duplicates_within_the_chunk_and_from_earlier_chunks_are_dropped():
    record = make_record()
    seen_before, fresh = make_event(record), make_event(record)
    retry = make_event(record, event_id=fresh.event_id, choice="b")  # a client retry that changed its mind
    messages = [message(0, seen_before), message(1, fresh), message(2, retry)]
    outcome = process_chunk(messages, {seen_before.event_id}, lookup_from(record), 0.5)
    assert [r["event_id"] for r in outcome.rows] == [fresh.event_id]
    assert outcome.rows[0]["choice"] == "a"  # the first one wins
    assert outcome.duplicates == 2


def test_filters_drop_no_choice_and_unlistened_pairs_but_remember_their_ids():
    record = make_record(duration_s=10.0)
    none, short, ok = make_event(record, choice="none"), make_event(record, listen=(10.0, 4.9)), make_event(record)
    outcome = process_chunk([message(i, e) for i, e in enumerate([none, short, ok])], set(), lookup_from(record), 0.5)
    assert [r["event_id"] for r in outcome.rows] == [ok.event_id]
    assert outcome.filtered == {"no_choice": 1, "not_listened": 1}
    assert set(outcome.new_event_ids) == {none.event_id, short.event_id, ok.event_id}


def test_invalid_messages_are_dead_lettered_with_reason_and_original_payload():
    record = make_record()
    good = make_event(record)
    unknown_generation = make_event(make_record())
    foreign_clip = make_event(record, clip_b_id=hex_id())
    document = json.loads(good.to_bytes())
    messages = [
        message(0, value=b"\xff\xfe not utf-8"),
        message(1, value=b"{not json"),
        message(2, value=b"[1, 2]"),
        message(3, value=json.dumps({**document, "schema": "preference.v0"}).encode()),
        message(4, value=json.dumps({**document, "choice": "both"}).encode(), key=good.generation_id.encode()),
        message(5, good, key=b"another-key"),
        message(6, unknown_generation),
        message(7, foreign_clip),
        message(8, value=None),
        message(9, good),
    ]
    outcome = process_chunk(messages, set(), lookup_from(record), 0.5)
    assert [r["kafka_offset"] for r in outcome.rows] == [9]
    reasons = {d.offset: d.reason for d in outcome.dead_letters}
    assert sorted(reasons) == list(range(9))
    assert reasons[0].startswith("not JSON") and reasons[1].startswith("not JSON")
    assert reasons[2].startswith("not a JSON object")
    assert "unsupported schema 'preference.v0'" in reasons[3]
    assert reasons[4].startswith("schema violation: choice")
    assert "is not the event's generation_id" in reasons[5]
    assert reasons[6] == f"generation {unknown_generation.generation_id} not found"
    assert "do not belong to generation" in reasons[7]
    assert "tombstone" in reasons[8]
    letters = {d.offset: d.to_json("preferences.v1") for d in outcome.dead_letters}
    assert letters[0]["payload"] == "base64:" + base64.b64encode(b"\xff\xfe not utf-8").decode()
    assert letters[1]["payload"] == "{not json" and letters[1]["topic"] == "preferences.v1"
    assert letters[6]["payload"] == unknown_generation.to_bytes().decode()


def test_a_generation_with_an_unusable_policy_version_is_dead_lettered_not_stuck():
    record = make_record(policy_versions=("1", "../../x"))
    outcome = process_chunk([message(0, make_event(record))], set(), lookup_from(record), 0.5)
    assert outcome.rows == [] and "unusable policy version" in outcome.dead_letters[0].reason


def test_same_input_gives_the_same_outcome():
    record = make_record()
    events = [make_event(record) for _ in range(5)]
    messages = [message(i, e) for i, e in enumerate(events + events[:2])] + [message(7, value=b"junk")]
    first = process_chunk(messages, set(), lookup_from(record), 0.5)
    second = process_chunk(messages, set(), lookup_from(record), 0.5)
    assert first.rows == second.rows and first.dead_letters == second.dead_letters
    assert first.duplicates == 2 and len(first.rows) == 5


def test_transient_lookup_failure_propagates_instead_of_dead_lettering():
    def failing(ids):
        raise GenerationLookupError("store down")

    with pytest.raises(GenerationLookupError):
        process_chunk([message(0, make_event(make_record()))], set(), failing, 0.5)
