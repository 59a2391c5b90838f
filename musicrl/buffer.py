"""The on-policy buffer: pairwise preferences joined with the generations they judge.

The feedback consumer appends Parquet segments under
``preferences/policy={policy_version}/partition={p}/{first:020d}-{last:020d}.parquet``
in the buffer bucket; the finetune worker reads them with :class:`PreferenceBuffer`.

One row is one preference on one pair of clips, with everything a trainer needs:
the verdict (``choice`` in ``a|b|tie``, ``is_tie``), the prompt, and for both
clips the policy version, the tokens and their log-probabilities at sampling
time. ``policy_version`` of a row is the newer of its two clips' versions (both
are the same except for pairs sampled during a hot swap, see ``mixed_policy``).

Segments are immutable and keyed by their Kafka offset range, so rewriting one
after a crash replaces it. The reader still drops repeated ``event_id`` values
(keeping the lowest partition/offset), a second line of defence against a
zombie consumer that wrote a different offset range for the same events.

Multi-codebook clips (MusicGen: K codebooks per frame) are stored flat: ``tokens_a``
and ``logprobs_a`` hold the K x T values codebook-major (codebook 0's frames first,
``np.reshape(K, T)`` gives them back), and ``codebooks_a`` / ``codebooks_b`` say K.
Those two columns are written only in segments that hold a clip with K > 1
(``CODEBOOK_SCHEMA``); a segment of one-codebook clips is exactly what it always was
(``ROW_SCHEMA``), so existing segments and readers are unaffected. ``PreferenceBuffer``
adds the columns, 1 for those rows, whenever one segment it reads has them
(``clip_codes`` turns a row's tokens back into ``[K, T]``).
"""

from __future__ import annotations

import hashlib
import io
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import TypedDict

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from musicrl.config import PreferenceRulesConfig
from musicrl.storage import ObjectStore

SEGMENT_PREFIX = "preferences/"
_SEGMENT_RE = re.compile(
    r"^preferences/policy=(?P<policy>[^/]+)/partition=(?P<partition>\d+)/(?P<first>\d{20})-(?P<last>\d{20})\.parquet$"
)

_TS = pa.timestamp("us", tz="UTC")

ROW_SCHEMA = pa.schema(
    [
        ("event_id", pa.string()),
        ("generation_id", pa.string()),
        ("clip_a_id", pa.string()),
        ("clip_b_id", pa.string()),
        ("choice", pa.string()),
        ("is_tie", pa.bool_()),
        ("listen_a_s", pa.float64()),
        ("listen_b_s", pa.float64()),
        ("listen_a_frac", pa.float64()),
        ("listen_b_frac", pa.float64()),
        ("user_pseudonym", pa.string()),
        ("app_id", pa.string()),
        ("client_ts", _TS),
        ("received_at", _TS),
        ("prompt", pa.string()),
        ("experiment", pa.string()),
        ("temperature", pa.float64()),
        ("top_k", pa.int32()),
        ("policy_version", pa.string()),
        ("mixed_policy", pa.bool_()),
        ("policy_version_a", pa.string()),
        ("policy_version_b", pa.string()),
        ("seed_a", pa.int64()),
        ("seed_b", pa.int64()),
        ("duration_a_s", pa.float64()),
        ("duration_b_s", pa.float64()),
        ("tokens_a", pa.list_(pa.int32())),
        ("tokens_b", pa.list_(pa.int32())),
        ("logprobs_a", pa.list_(pa.float32())),
        ("logprobs_b", pa.list_(pa.float32())),
        ("kafka_partition", pa.int32()),
        ("kafka_offset", pa.int64()),
    ],
    metadata={"schema": "buffer.preference.v1"},
)


class _Columns(TypedDict):
    """The columns of ``ROW_SCHEMA``, in its order."""

    event_id: str
    generation_id: str
    clip_a_id: str
    clip_b_id: str
    choice: str  # "a", "b" or "tie" (the consumer drops "none": usable_pair)
    is_tie: bool
    listen_a_s: float
    listen_b_s: float
    listen_a_frac: float
    listen_b_frac: float
    user_pseudonym: str
    app_id: str
    client_ts: datetime | None
    received_at: datetime
    prompt: str
    experiment: str | None
    temperature: float
    top_k: int
    policy_version: str
    mixed_policy: bool
    policy_version_a: str
    policy_version_b: str
    seed_a: int
    seed_b: int
    duration_a_s: float
    duration_b_s: float
    tokens_a: list[int]  # flat, codebook-major (clip_codes)
    tokens_b: list[int]
    logprobs_a: list[float]
    logprobs_b: list[float]
    kafka_partition: int
    kafka_offset: int


class PreferenceRow(_Columns, total=False):
    """One buffer row as Python sees it (``PreferenceBuffer.read(...).to_pylist()``, ``rows_to_parquet``): the
    columns of ``ROW_SCHEMA`` (``tests/unit/test_feedback_buffer.py`` checks that the two agree), plus the
    codebook columns, present in multi-codebook segments only."""

    codebooks_a: int
    codebooks_b: int


# Codebooks per clip (K), only in segments holding a clip with K > 1 (see the module docstring).
CODEBOOK_COLUMNS = ("codebooks_a", "codebooks_b")
CODEBOOK_SCHEMA = pa.schema(
    [*ROW_SCHEMA, *(pa.field(name, pa.int32()) for name in CODEBOOK_COLUMNS)], metadata=ROW_SCHEMA.metadata
)


def clip_codes(tokens: Sequence[int], codebooks: int | None = 1):
    """A buffer row's flat, codebook-major ``tokens_a`` (or ``tokens_b``, or log-probs) as a ``[K, T]`` array."""
    import numpy as np  # noqa: PLC0415

    return np.asarray(tokens).reshape(int(codebooks or 1), -1)


@dataclass(frozen=True, order=True)
class SegmentRef:
    """Where one segment lives and which Kafka offsets it covers (inclusive)."""

    partition: int
    first_offset: int
    last_offset: int
    policy_version: str

    @property
    def key(self) -> str:
        return segment_key(self.policy_version, self.partition, self.first_offset, self.last_offset)


# The default of the one setting (MUSICRL_MIN_LISTEN_FRACTION); services pass their settings' value.
DEFAULT_MIN_LISTEN_FRACTION = PreferenceRulesConfig.model_fields["min_listen_fraction"].default


def listened_to_both(row: PreferenceRow | dict, min_listen_fraction: float) -> bool:
    """Did the user hear at least ``min_listen_fraction`` of each clip (``listen_a_frac`` / ``listen_b_frac``)?"""
    fractions = (row.get("listen_a_frac"), row.get("listen_b_frac"))
    return all(f is not None and f >= min_listen_fraction for f in fractions)


def usable_pair(row: PreferenceRow, min_listen_fraction: float, *, ties: bool = True) -> bool:
    """The one rule for which votes count (``MUSICRL_MIN_LISTEN_FRACTION``, ``musicrl.config.PreferenceRulesConfig``):
    a choice of a clip (or a tie, when ``ties``) by a user who heard both clips. The consumer writes only such
    rows to the buffer; the reward model (ties kept) and DPO (ties dropped) read with it too."""
    return row.get("choice") in (("a", "b", "tie") if ties else ("a", "b")) and listened_to_both(
        row, min_listen_fraction
    )


_POLICY_VERSION_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def is_valid_policy_version(version: str) -> bool:
    """Policy versions become part of object keys: letters, digits, '.', '_' and '-' only."""
    return bool(_POLICY_VERSION_RE.match(version))


def segment_key(policy_version: str, partition: int, first_offset: int, last_offset: int) -> str:
    if not is_valid_policy_version(policy_version):
        raise ValueError(f"policy version {policy_version!r} cannot be part of an object key")
    return (
        f"{SEGMENT_PREFIX}policy={policy_version}/partition={partition}/{first_offset:020d}-{last_offset:020d}.parquet"
    )


def parse_segment_key(key: str) -> SegmentRef | None:
    match = _SEGMENT_RE.match(key)
    if match is None:
        return None
    return SegmentRef(
        partition=int(match["partition"]),
        first_offset=int(match["first"]),
        last_offset=int(match["last"]),
        policy_version=match["policy"],
    )


def rows_to_parquet(rows: Sequence[PreferenceRow]) -> bytes:
    """Serialise buffer rows (dicts with the ``ROW_SCHEMA`` columns) to Parquet bytes.

    Rows may carry ``codebooks_a`` / ``codebooks_b``; the segment gets those columns
    (``CODEBOOK_SCHEMA``, missing values 1) only when one of them is above 1.
    """
    rows = list(rows)
    if any((row.get(name) or 1) != 1 for row in rows for name in CODEBOOK_COLUMNS):
        rows = [row | {name: row.get(name) or 1 for name in CODEBOOK_COLUMNS} for row in rows]
        table = pa.Table.from_pylist(rows, schema=CODEBOOK_SCHEMA)
    else:
        table = pa.Table.from_pylist(rows, schema=ROW_SCHEMA)
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd", compression_level=1)
    return sink.getvalue()


def parquet_to_table(data: bytes) -> pa.Table:
    return pq.read_table(io.BytesIO(data))


def _policy_sort_key(version: str) -> tuple[int, int | str]:
    # Generator versions are integers as strings; anything else sorts after them, by name.
    return (0, int(version)) if version.isdigit() else (1, version)


def newest_policy(*versions: str) -> str:
    return max(versions, key=_policy_sort_key)


def split_of(generation_id: str, eval_fraction: float, salt: str = "musicrl-buffer-split") -> str:
    """'train' or 'eval' for a generation, stable across runs, machines and buffer growth.

    Splitting by generation (not by event) keeps every vote on the same pair of
    clips on the same side, so eval pairs are never seen in training.
    """
    digest = hashlib.sha256(f"{salt}:{generation_id}".encode()).digest()
    position = int.from_bytes(digest[:8], "big") / 2**64
    return "eval" if position < eval_fraction else "train"


class PreferenceBuffer:
    """Reads the on-policy buffer from the object store."""

    def __init__(self, store: ObjectStore, bucket: str | None = None, read_workers: int = 8):
        self.store = store
        self.bucket = bucket or store.config.bucket_buffer
        self.read_workers = read_workers

    def policy_versions(self) -> list[str]:
        versions = {ref.policy_version for ref in self.segments()}
        return sorted(versions, key=_policy_sort_key)

    def segments(self, policy_versions: Iterable[str] | None = None) -> list[SegmentRef]:
        prefixes = (
            [SEGMENT_PREFIX] if policy_versions is None else [f"{SEGMENT_PREFIX}policy={v}/" for v in policy_versions]
        )
        refs = []
        for prefix in prefixes:
            for key in self.store.list_keys(self.bucket, prefix=prefix):
                ref = parse_segment_key(key)
                if ref is not None:
                    refs.append(ref)
        return sorted(refs)

    def _segments_in_window(
        self, min_policy: str | None, max_policy: str | None, last_policies: int | None
    ) -> list[SegmentRef]:
        refs = self.segments()
        versions = sorted({r.policy_version for r in refs}, key=_policy_sort_key)
        if min_policy is not None:
            versions = [v for v in versions if _policy_sort_key(v) >= _policy_sort_key(min_policy)]
        if max_policy is not None:
            versions = [v for v in versions if _policy_sort_key(v) <= _policy_sort_key(max_policy)]
        if last_policies is not None:
            versions = versions[-last_policies:] if last_policies > 0 else []
        keep = set(versions)
        return [r for r in refs if r.policy_version in keep]

    def _read_segments(self, refs: Sequence[SegmentRef], columns: list[str] | None = None) -> pa.Table:
        if not refs:
            return ROW_SCHEMA.empty_table() if columns is None else CODEBOOK_SCHEMA.empty_table().select(columns)

        def read(ref: SegmentRef) -> pa.Table:
            table = parquet_to_table(self.store.get_bytes(self.bucket, ref.key))
            return table.select([c for c in columns if c in table.column_names]) if columns is not None else table

        with ThreadPoolExecutor(max_workers=self.read_workers) as pool:
            tables = list(pool.map(read, refs))
        return _with_codebooks(tables, columns)

    def read(
        self,
        *,
        min_policy: str | None = None,
        max_policy: str | None = None,
        last_policies: int | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        include_ties: bool = True,
        columns: list[str] | None = None,
        deduplicate: bool = True,
    ) -> pa.Table:
        """Preferences in a policy-version window and/or a ``received_at`` range [since, until).

        ``min_policy``/``max_policy`` are inclusive; ``last_policies=k`` keeps the
        k newest policy versions present in the buffer (the on-policy window).
        Repeated event ids are dropped, keeping the lowest (partition, offset),
        unless ``deduplicate=False`` (for checking that the buffer holds none).
        """
        needed = None
        if columns is not None:
            needed = list(
                dict.fromkeys([*columns, "event_id", "kafka_partition", "kafka_offset", "received_at", "is_tie"])
            )
        table = self._read_segments(self._segments_in_window(min_policy, max_policy, last_policies), needed)
        if since is not None:
            table = table.filter(pc.greater_equal(table["received_at"], pa.scalar(since, type=_TS)))
        if until is not None:
            table = table.filter(pc.less(table["received_at"], pa.scalar(until, type=_TS)))
        if not include_ties:
            table = table.filter(pc.invert(table["is_tie"]))
        if deduplicate:
            table = deduplicate_events(table)
        return table.select(columns) if columns is not None else table

    def split(
        self, table: pa.Table, eval_fraction: float = 0.1, salt: str = "musicrl-buffer-split"
    ) -> tuple[pa.Table, pa.Table]:
        """Deterministic (train, eval) split of ``table`` by generation id."""
        is_eval = pa.array(
            [split_of(g, eval_fraction, salt) == "eval" for g in table["generation_id"].to_pylist()], pa.bool_()
        )
        return table.filter(pc.invert(is_eval)), table.filter(is_eval)

    def counts_by_policy(self) -> dict[str, int]:
        """Unique preferences per policy version (ties included)."""
        table = self.read(columns=["policy_version"])
        counts = Counter(table["policy_version"].to_pylist())
        return {v: counts[v] for v in sorted(counts, key=_policy_sort_key)}

    def event_ids(self) -> set[str]:
        return set(self.read(columns=["event_id"])["event_id"].to_pylist())


def _with_codebooks(tables: list[pa.Table], columns: list[str] | None) -> pa.Table:
    """Concatenate segment tables. Where one of them has the codebook columns (or ``columns`` asks for them),
    every table gets them, 1 for its one-codebook rows; buffers of one-codebook segments read as they always did."""
    if columns is None:
        wanted = [c for c in CODEBOOK_COLUMNS if any(c in t.column_names for t in tables)]
    else:
        wanted = [c for c in CODEBOOK_COLUMNS if c in columns]
    if not wanted:
        return pa.concat_tables(tables)
    filled = []
    for table in tables:
        for name in wanted:
            if name not in table.column_names:
                table = table.append_column(pa.field(name, pa.int32()), pa.array([1] * table.num_rows, pa.int32()))
        order = (
            [*(n for n in table.column_names if n not in CODEBOOK_COLUMNS), *wanted]
            if columns is None
            else [c for c in columns if c in table.column_names]
        )
        filled.append(table.select(order))
    return pa.concat_tables(filled)


def deduplicate_events(table: pa.Table) -> pa.Table:
    """Keep one row per event id: the one with the lowest (kafka_partition, kafka_offset)."""
    if table.num_rows == 0:
        return table
    table = table.sort_by([("event_id", "ascending"), ("kafka_partition", "ascending"), ("kafka_offset", "ascending")])
    ids = table["event_id"]
    if table.num_rows == 1:
        return table
    previous = pa.concat_arrays([pa.array([None], pa.string()), ids.combine_chunks().slice(0, table.num_rows - 1)])
    first_of_group = pc.fill_null(pc.not_equal(ids.combine_chunks(), previous), True)
    return table.filter(first_of_group).sort_by(
        [("received_at", "ascending"), ("kafka_partition", "ascending"), ("kafka_offset", "ascending")]
    )
