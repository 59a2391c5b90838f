"""Multi-codebook clips (MusicGen, issue 15) through the join and the buffer, next to one-codebook segments."""

from __future__ import annotations

import numpy as np
import pytest
from feedback_helpers import InMemoryStore, make_event, make_record
from test_feedback_buffer import rows_for, write

from musicrl.buffer import CODEBOOK_COLUMNS, ROW_SCHEMA, PreferenceBuffer, clip_codes, parquet_to_table, rows_to_parquet
from musicrl.schemas.generation import GenerationRecord

pytestmark = pytest.mark.unit


def musicgen_record(policy_version: str = "2", codebooks: int = 4, frames: int = 6) -> GenerationRecord:
    """A record as the gateway stores a MusicGen generation: [K][T] tokens and log-probs, 32 kHz."""
    raw = make_record((policy_version, policy_version)).to_json()
    for i, clip in enumerate(raw["clips"]):
        tokens = np.arange(codebooks * frames).reshape(codebooks, frames) + 100 * i
        clip["tokens"] = tokens.tolist()
        clip["logprobs"] = (-(tokens % 7) / 8.0).tolist()
        clip["sample_rate"] = 32000
    return GenerationRecord.model_validate(raw)


def test_one_codebook_segments_are_written_exactly_as_before():
    record = make_record(n_tokens=5)
    rows = rows_for([(record, make_event(record))])
    assert rows[0]["codebooks_a"] == rows[0]["codebooks_b"] == 1
    table = parquet_to_table(rows_to_parquet(rows))
    assert table.column_names == ROW_SCHEMA.names
    stripped = [{k: v for k, v in row.items() if k not in CODEBOOK_COLUMNS} for row in rows]
    assert rows_to_parquet(rows) == rows_to_parquet(stripped)  # byte for byte what a row without them gives


def test_multi_codebook_rows_are_flat_codebook_major_with_their_codebook_count():
    record = musicgen_record()
    rows = rows_for([(record, make_event(record, choice="b"))])
    back = parquet_to_table(rows_to_parquet(rows)).to_pylist()[0]
    assert (back["codebooks_a"], back["codebooks_b"]) == (4, 4)
    assert clip_codes(back["tokens_a"], back["codebooks_a"]).tolist() == record.clips[0].tokens
    np.testing.assert_allclose(clip_codes(back["logprobs_b"], back["codebooks_b"]), record.clips[1].logprobs)


def test_reading_a_buffer_of_both_kinds_gives_every_row_its_codebook_count():
    store = InMemoryStore()
    default, musicgen = make_record(("1", "1"), n_tokens=5), musicgen_record("2")
    write(store, rows_for([(default, make_event(default))], first_offset=0))
    write(store, rows_for([(musicgen, make_event(musicgen))], first_offset=1))
    buffer = PreferenceBuffer(store)

    table = buffer.read()
    by_policy = {row["policy_version"]: row for row in table.to_pylist()}
    assert (by_policy["1"]["codebooks_a"], by_policy["2"]["codebooks_a"]) == (1, 4)
    assert clip_codes(by_policy["1"]["tokens_a"], by_policy["1"]["codebooks_a"]).shape == (1, 5)
    assert clip_codes(by_policy["2"]["tokens_b"], by_policy["2"]["codebooks_b"]).shape == (4, 6)
    assert buffer.read(columns=["policy_version", "codebooks_b"]).column("codebooks_b").to_pylist() in ([1, 4], [4, 1])
    assert buffer.read(max_policy="1").column_names == ROW_SCHEMA.names  # one-codebook only: as it always read
    assert buffer.counts_by_policy() == {"1": 1, "2": 1}
