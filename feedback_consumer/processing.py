"""What happens to one chunk of messages from one partition: pure logic, no I/O.

Given the messages of a contiguous offset range, the event ids already seen on
the partition and a way to look up generation records, :func:`process_chunk`
decides for every message exactly one outcome:

- ``dead_letter``: not a valid ``preference.v1`` event, or it refers to a
  generation or clips that do not exist (the reason is kept);
- ``duplicate``: its event id was seen before (the first one wins);
- ``filtered``: valid but not a training signal (choice ``none``, or one of the
  clips listened to for less than the minimum fraction);
- ``accepted``: a buffer row joined with the generation record.

The result depends only on its inputs, so re-processing a chunk after a crash
gives the same rows, the same segment keys and the same dead letters.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from pydantic import ValidationError

from musicrl.buffer import PreferenceRow, is_valid_policy_version, newest_policy, usable_pair
from musicrl.schemas.generation import GenerationRecord
from musicrl.schemas.preference import SCHEMA_ID, PreferenceEvent


@dataclass(frozen=True)
class Message:
    """The parts of a Kafka record the consumer uses."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


@dataclass(frozen=True)
class DeadLetter:
    partition: int
    offset: int
    reason: str
    value: bytes | None

    def to_json(self, topic: str) -> dict:
        return {
            "reason": self.reason,
            "payload": payload_text(self.value),
            "topic": topic,
            "partition": self.partition,
            "offset": self.offset,
        }


@dataclass
class ChunkOutcome:
    rows: list[PreferenceRow] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    # Ids of every valid, first-seen event (accepted or filtered): the de-duplication state.
    new_event_ids: list[str] = field(default_factory=list)
    duplicates: int = 0
    filtered: dict[str, int] = field(default_factory=dict)

    def rows_by_policy(self) -> dict[str, list[dict]]:
        groups: dict[str, list[dict]] = {}
        for row in self.rows:
            groups.setdefault(row["policy_version"], []).append(row)
        return groups


class GenerationLookupError(RuntimeError):
    """A generation record could not be read for a transient reason: retry the chunk."""


def payload_text(value: bytes | None) -> str:
    """The original payload for a dead letter: UTF-8 text when it is, else ``base64:``-prefixed."""
    if value is None:
        return ""
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return "base64:" + base64.b64encode(value).decode()


def parse_event(message: Message) -> PreferenceEvent | str:
    """The event, or the reason it is not a valid ``preference.v1`` event."""
    if message.value is None:
        return "empty message (tombstone)"
    try:
        event = PreferenceEvent.model_validate_json(message.value)
    except ValidationError as err:
        return _rejection_reason(message.value, err)
    if message.key is not None and message.key != event.generation_id.encode():
        return f"message key {payload_text(message.key)!r} is not the event's generation_id"
    return event


def _rejection_reason(value: bytes, err: ValidationError) -> str:
    # The fast path parsed and validated in one go; this one tells apart why it failed.
    try:
        document = json.loads(value)
    except (UnicodeDecodeError, ValueError) as json_err:
        return f"not JSON: {json_err}"
    if not isinstance(document, dict):
        return f"not a JSON object: {type(document).__name__}"
    schema_id = document.get("schema")
    if schema_id != SCHEMA_ID:
        return f"unsupported schema {schema_id!r} (expected {SCHEMA_ID!r})"
    problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '<event>'}: {e['msg']}" for e in err.errors()[:5])
    return f"schema violation: {problems}"


def _listen_fraction(listen_s: float, duration_s: float) -> float:
    return min(listen_s / duration_s, 1.0) if duration_s > 0 else 0.0


def join_row(event: PreferenceEvent, record: GenerationRecord, message: Message) -> dict | str:
    """The buffer row of an event, or why its clips do not match its generation."""
    clip_a, clip_b = record.clip(event.clip_a_id), record.clip(event.clip_b_id)
    missing = [c for c, clip in ((event.clip_a_id, clip_a), (event.clip_b_id, clip_b)) if clip is None]
    if missing:
        return f"clip(s) {', '.join(missing)} do not belong to generation {event.generation_id}"
    for clip in (clip_a, clip_b):
        if not is_valid_policy_version(clip.policy_version):
            return f"generation {event.generation_id} has an unusable policy version {clip.policy_version!r}"
    return {
        "event_id": event.event_id,
        "generation_id": event.generation_id,
        "clip_a_id": event.clip_a_id,
        "clip_b_id": event.clip_b_id,
        "choice": event.choice,
        "is_tie": event.choice == "tie",
        "listen_a_s": event.listen_a_s,
        "listen_b_s": event.listen_b_s,
        "listen_a_frac": _listen_fraction(event.listen_a_s, clip_a.duration_s),
        "listen_b_frac": _listen_fraction(event.listen_b_s, clip_b.duration_s),
        "user_pseudonym": event.user_pseudonym,
        "app_id": event.app_id,
        "client_ts": event.client_ts,
        "received_at": event.received_at,
        "prompt": record.prompt,
        "experiment": record.experiment,
        "temperature": record.params.temperature,
        "top_k": record.params.top_k,
        "policy_version": newest_policy(clip_a.policy_version, clip_b.policy_version),
        "mixed_policy": clip_a.policy_version != clip_b.policy_version,
        "policy_version_a": clip_a.policy_version,
        "policy_version_b": clip_b.policy_version,
        "seed_a": clip_a.seed,
        "seed_b": clip_b.seed,
        "duration_a_s": clip_a.duration_s,
        "duration_b_s": clip_b.duration_s,
        # Flat, codebook-major; K in codebooks_a/b (musicrl.buffer: segments of one-codebook rows omit them).
        "tokens_a": clip_a.flat("tokens"),
        "tokens_b": clip_b.flat("tokens"),
        "logprobs_a": clip_a.flat("logprobs"),
        "logprobs_b": clip_b.flat("logprobs"),
        "codebooks_a": clip_a.num_codebooks,
        "codebooks_b": clip_b.num_codebooks,
        "kafka_partition": message.partition,
        "kafka_offset": message.offset,
    }


def process_chunk(
    messages: Iterable[Message],
    seen_event_ids: set[str] | frozenset[str],
    lookup_generations: Callable[[set[str]], Mapping[str, GenerationRecord | None]],
    min_listen_fraction: float,
) -> ChunkOutcome:
    """Classify every message of a chunk (see the module docstring).

    ``lookup_generations`` maps generation ids to records (``None``: does not
    exist) and raises :class:`GenerationLookupError` on transient failures.
    """
    outcome = ChunkOutcome()
    seen_in_chunk: set[str] = set()
    first_seen: list[tuple[Message, PreferenceEvent]] = []
    for message in messages:
        parsed = parse_event(message)
        if isinstance(parsed, str):
            outcome.dead_letters.append(DeadLetter(message.partition, message.offset, parsed, message.value))
            continue
        if parsed.event_id in seen_event_ids or parsed.event_id in seen_in_chunk:
            outcome.duplicates += 1
            continue
        seen_in_chunk.add(parsed.event_id)
        first_seen.append((message, parsed))

    records = lookup_generations({event.generation_id for _, event in first_seen}) if first_seen else {}
    for message, event in first_seen:
        record = records.get(event.generation_id)
        if record is None:
            outcome.dead_letters.append(
                DeadLetter(
                    message.partition, message.offset, f"generation {event.generation_id} not found", message.value
                )
            )
            continue
        row = join_row(event, record, message)
        if isinstance(row, str):
            outcome.dead_letters.append(DeadLetter(message.partition, message.offset, row, message.value))
            continue
        outcome.new_event_ids.append(event.event_id)
        reason = _filter_reason(row, min_listen_fraction)
        if reason is not None:
            outcome.filtered[reason] = outcome.filtered.get(reason, 0) + 1
            continue
        outcome.rows.append(row)
    outcome.dead_letters.sort(key=lambda d: d.offset)
    return outcome


def _filter_reason(row: PreferenceRow, min_listen_fraction: float) -> str | None:
    """Why a joined vote is not written (``musicrl.buffer.usable_pair``, the rule the trainers read with)."""
    if usable_pair(row, min_listen_fraction):
        return None
    return "no_choice" if row["choice"] == "none" else "not_listened"
