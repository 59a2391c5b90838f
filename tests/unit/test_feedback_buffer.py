"""The on-policy buffer: segment keys, Parquet rows, windows, de-duplication and the split."""

from __future__ import annotations

from datetime import timedelta

import pytest
from feedback_helpers import T0, InMemoryStore, make_event, make_record

from feedback_consumer.processing import Message, process_chunk
from musicrl.buffer import (
    PreferenceBuffer,
    SegmentRef,
    parquet_to_table,
    parse_segment_key,
    rows_to_parquet,
    segment_key,
    split_of,
)

pytestmark = pytest.mark.unit


def test_segment_keys_follow_the_contract_and_parse_back():
    key = segment_key("12", 2, 5, 1999)
    assert key == "preferences/policy=12/partition=2/00000000000000000005-00000000000000001999.parquet"
    assert parse_segment_key(key) == SegmentRef(2, 5, 1999, "12")
    assert parse_segment_key("preferences/policy=1/partition=0/junk.parquet") is None
    with pytest.raises(ValueError):
        segment_key("a/b", 0, 0, 1)


def rows_for(records_and_events, first_offset=0, partition=0):
    lookup = {r.generation_id: r for r, _ in records_and_events}
    messages = [
        Message(partition, first_offset + i, e.generation_id.encode(), e.to_bytes())
        for i, (_, e) in enumerate(records_and_events)
    ]
    return process_chunk(messages, set(), lambda ids: {g: lookup.get(g) for g in ids}, 0.0).rows


def write(store, rows, partition=0):
    first, last = rows[0]["kafka_offset"], rows[-1]["kafka_offset"]
    key = segment_key(rows[0]["policy_version"], partition, first, last)
    store.put_bytes(store.config.bucket_buffer, key, rows_to_parquet(rows))


def test_rows_round_trip_through_parquet_with_tokens_and_timestamps():
    record = make_record(n_tokens=5)
    rows = rows_for([(record, make_event(record, choice="tie"))])
    table = parquet_to_table(rows_to_parquet(rows))
    back = table.to_pylist()[0]
    assert back["tokens_a"] == record.clips[0].tokens and back["is_tie"]
    assert back["logprobs_b"] == pytest.approx(record.clips[1].logprobs)
    assert back["received_at"] == T0 and back["client_ts"] == T0 - timedelta(seconds=1)


@pytest.fixture()
def filled_store():
    """Three policy versions, one hour apart, plus one segment re-written over another offset range."""
    store = InMemoryStore()
    events_by_policy = {}
    offset = 0
    for hour, policy in enumerate(["1", "2", "10"]):
        record = make_record(policy_versions=(policy, policy))
        pairs = [(record, make_event(record, received_at=T0 + timedelta(hours=hour, minutes=i))) for i in range(4)]
        rows = rows_for(pairs, first_offset=offset)
        write(store, rows)
        events_by_policy[policy] = [e.event_id for _, e in pairs]
        offset += len(pairs)
    # A zombie consumer wrote events 2..3 of policy 10 again under another range.
    record = make_record(policy_versions=("10", "10"))
    again = rows_for(
        [(record, make_event(record, event_id=events_by_policy["10"][2], received_at=T0 + timedelta(hours=2)))],
        first_offset=100,
    )
    write(store, again)
    return store, events_by_policy


def test_reader_windows_by_policy_and_time_and_drops_repeated_event_ids(filled_store):
    store, events = filled_store
    buffer = PreferenceBuffer(store)
    assert buffer.policy_versions() == ["1", "2", "10"]  # numeric order, not lexical
    everything = buffer.read()
    assert everything.num_rows == 12
    assert sorted(everything["event_id"].to_pylist()) == sorted(sum(events.values(), []))
    assert set(buffer.read(last_policies=1)["event_id"].to_pylist()) == set(events["10"])
    assert set(buffer.read(min_policy="2", max_policy="2")["event_id"].to_pylist()) == set(events["2"])
    window = buffer.read(since=T0 + timedelta(hours=1), until=T0 + timedelta(hours=1, minutes=2))
    assert window["event_id"].to_pylist() == events["2"][:2]
    assert buffer.counts_by_policy() == {"1": 4, "2": 4, "10": 4}
    kept = buffer.read(columns=["event_id", "kafka_offset"]).to_pylist()
    assert {"event_id": events["10"][2], "kafka_offset": 10} in kept  # the lowest offset wins


def test_ties_can_be_left_out(filled_store):
    store, _ = filled_store
    record = make_record(policy_versions=("11", "11"))
    write(store, rows_for([(record, make_event(record, choice="tie")), (record, make_event(record))], first_offset=200))
    buffer = PreferenceBuffer(store)
    assert buffer.read(min_policy="11").num_rows == 2
    assert buffer.read(min_policy="11", include_ties=False)["choice"].to_pylist() == ["a"]


def test_split_is_deterministic_by_generation_and_close_to_the_fraction(filled_store):
    ids = [f"{i:032x}" for i in range(4000)]
    eval_share = sum(split_of(g, 0.2) == "eval" for g in ids) / len(ids)
    assert 0.17 < eval_share < 0.23
    assert [split_of(g, 0.2) for g in ids[:50]] == [split_of(g, 0.2) for g in ids[:50]]
    assert sum(split_of(g, 0.2, salt="other") != split_of(g, 0.2) for g in ids) > 100

    store, _ = filled_store
    buffer = PreferenceBuffer(store)
    train, evaluation = buffer.split(buffer.read(), eval_fraction=0.5)
    assert train.num_rows + evaluation.num_rows == 12
    assert not set(train["generation_id"].to_pylist()) & set(evaluation["generation_id"].to_pylist())


def test_empty_buffer_reads_as_an_empty_table():
    buffer = PreferenceBuffer(InMemoryStore())
    assert buffer.read().num_rows == 0 and buffer.counts_by_policy() == {} and buffer.event_ids() == set()


def test_the_typed_row_has_the_columns_and_types_of_the_arrow_schema():
    import typing
    from datetime import datetime

    import pyarrow as pa

    from musicrl.buffer import CODEBOOK_SCHEMA, PreferenceRow

    python_of = {
        pa.string(): str,
        pa.bool_(): bool,
        pa.float64(): float,
        pa.int32(): int,
        pa.int64(): int,
        pa.list_(pa.int32()): list[int],
        pa.list_(pa.float32()): list[float],
    }
    hints = typing.get_type_hints(PreferenceRow)
    assert list(hints) == CODEBOOK_SCHEMA.names
    for field in CODEBOOK_SCHEMA:
        expected = datetime if pa.types.is_timestamp(field.type) else python_of[field.type]
        hint = hints[field.name]
        assert hint == expected or hint == (expected | None), (field.name, hint, field.type)
    assert PreferenceRow.__optional_keys__ == {"codebooks_a", "codebooks_b"}
