"""The chunk ledger: the consumer's durable memory in the buffer bucket (``dedup/``).

Before it writes anything else for a chunk (a contiguous offset range of one
partition), the consumer writes the chunk's ledger entry
``dedup/partition={p}/{first:020d}-{last:020d}.json``: the event ids it holds
(the de-duplication state), the segment keys it will write and the offsets it
will dead-letter. The entry is the chunk's intent: after a crash, a ledger
entry not covered by the committed offset is re-processed with exactly the
same boundaries, so its segments get exactly the same keys and overwrite any
partial attempt. Kafka's committed offset marks the chunk as done.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

from musicrl.storage import ObjectStore

LEDGER_PREFIX = "dedup/"
_ENTRY_RE = re.compile(r"^dedup/partition=(?P<partition>\d+)/(?P<first>\d{20})-(?P<last>\d{20})\.json$")


@dataclass(frozen=True)
class LedgerEntry:
    partition: int
    first_offset: int
    last_offset: int
    event_ids: list[str] = field(default_factory=list)
    segments: list[str] = field(default_factory=list)
    dead_letter_offsets: list[int] = field(default_factory=list)
    duplicates: int = 0
    filtered: dict[str, int] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return ledger_key(self.partition, self.first_offset, self.last_offset)

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> LedgerEntry:
        return cls(**json.loads(data))


def ledger_key(partition: int, first_offset: int, last_offset: int) -> str:
    return f"{LEDGER_PREFIX}partition={partition}/{first_offset:020d}-{last_offset:020d}.json"


def _parse_key(key: str) -> tuple[int, int, int] | None:
    match = _ENTRY_RE.match(key)
    return None if match is None else (int(match["partition"]), int(match["first"]), int(match["last"]))


class Ledger:
    def __init__(self, store: ObjectStore, bucket: str, read_workers: int = 8):
        self.store = store
        self.bucket = bucket
        self.read_workers = read_workers

    def write(self, entry: LedgerEntry) -> None:
        self.store.put_bytes(self.bucket, entry.key, entry.to_bytes(), "application/json")

    def load_partition(self, partition: int, window_offsets: int) -> list[LedgerEntry]:
        """Entries of a partition whose last offset is within ``window_offsets`` of the newest, oldest first."""
        ranges = []
        for key in self.store.list_keys(self.bucket, prefix=f"{LEDGER_PREFIX}partition={partition}/"):
            parsed = _parse_key(key)
            if parsed is not None:
                ranges.append((parsed[1], parsed[2], key))
        if not ranges:
            return []
        newest = max(last for _, last, _ in ranges)
        keys = [key for _, last, key in sorted(ranges) if last > newest - window_offsets]
        with ThreadPoolExecutor(max_workers=self.read_workers) as pool:
            return list(pool.map(lambda k: LedgerEntry.from_bytes(self.store.get_bytes(self.bucket, k)), keys))
