"""Reliability of the public surface: auth and limits, forged votes, decode bombs, consumer state, API fuzzing.

``musicrl experiment reliability`` starts a private stack of the real servers and services
(``private_loop_stack``: SeaweedFS, Tansu, Triton, reward service, gateway, consumer on free
ports) and measures five things, each selectable with ``--parts``:

1. **auth**: every write route of the gateway's OpenAPI document answers 401 without a
   key (and with an unknown one); a key over its rate (``limited``, a few requests per
   minute) gets 429 with ``Retry-After``, as does a key over its concurrency cap (``narrow``).
2. **votes**: forged and replayed votes of several kinds (``FORGED_KINDS``) sent through
   ``POST /v1/feedback`` interleaved with valid ones; after the consumer settles the buffer
   (``PreferenceBuffer``) must hold every valid vote and none of the forged ones (by event id).
3. **bombs**: WAV/FLAC headers claiming megahertz rates, thousands of channels or hours,
   oversized token lists, items and bodies, sent to the reward service's ``POST /v1/scores``
   (inline and by ``clip_id``): each must get a 4xx, and the service's peak resident memory
   during the bombs (``VmHWM`` after resetting it, and a sampler) is compared with its idle RSS.
4. **consumer**: a synthetic buffer of N votes (Parquet segments with the buffer's schema and
   the matching ledger entries, as the consumer would have written them) for each size; a fresh
   ``musicrl consumer run`` is started on it and timed until healthy and until it has restored
   its partitions (ledger read), then its RSS is read.
5. **schemathesis**: ``schemathesis run --checks all`` against both OpenAPI documents with the
   stack's API key and a bounded number of examples per operation.

Results: ``results/reliability.json`` (``summarize`` adds the targets and whether each is met).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import secrets
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from musicrl.logging import get_logger

log = get_logger(__name__)
Progress = Callable[[str], None]
ROOT = Path(__file__).resolve().parents[1]

PARTS = ("auth", "votes", "bombs", "consumer", "schemathesis")
FORGED_KINDS = (
    "no_token",  # vote_token missing: 422 (schema)
    "random_token",  # v1.<random>.<random>: 403
    "other_generation",  # a real token, for another generation: 403
    "other_user",  # a real token, voted by another user: 403
    "other_key",  # a real token, posted with another API key: 403
    "wrong_clip",  # a real token, a clip it does not name: 403
    "replay",  # a vote already accepted, again with a new event_id: 409 (429 once the user is over 30/min)
    "listen_too_long",  # a real token, longer listening time than the clip: 422
    "expired",  # a token signed with the gateway's key whose expiry has passed: 403
)
TARGET_BOMB_RATIO = 2.0  # peak RSS during the bombs / idle RSS
TARGET_CONSUMER_SPREAD = 0.2  # largest vs smallest buffer: RSS and start-up within 20 %

GATEWAY_MAX_DURATION_S = 5.0  # the private gateway's longest clip (the default is 30 s)
# Names of the private stack's extra API keys (docs/serving.md, "API keys").
LIMITED_KEY, NARROW_KEY, OTHER_KEY = "limited", "narrow", "other"


@dataclass
class ReliabilityConfig:
    parts: tuple[str, ...] = PARTS
    forged: int = 1000  # forged or replayed votes
    valid: int = 40  # valid votes sent among them (one generation each)
    buffer_sizes: tuple[int, ...] = (20_000, 200_000)
    chunk_events: int = 1000  # votes per ledger entry of the synthetic buffers (the consumer's chunks)
    bomb_repeats: int = 3
    consumer_repeats: int = 3  # consumer starts per buffer size (medians reported)
    max_examples: int = 20  # schemathesis, per operation
    schemathesis_timeout_s: int = 1200  # per document: killed after (no report then)
    limited_rate_per_min: int = 3
    clip_s: float = 1.0  # seconds of audio per generated clip
    seed: int = 0

    def validate(self) -> None:
        unknown = set(self.parts) - set(PARTS)
        if unknown or not self.parts:
            raise ValueError(f"unknown parts {sorted(unknown)}; choose among {', '.join(PARTS)}")
        if self.forged < 0 or self.valid < 1:
            raise ValueError("--forged must be >= 0 and --valid >= 1")
        if not self.buffer_sizes or min(self.buffer_sizes) < 1:
            raise ValueError("--buffer-sizes needs at least one size >= 1")
        if min(self.chunk_events, self.bomb_repeats, self.max_examples, self.consumer_repeats) < 1:
            raise ValueError("--chunk-events, --bomb-repeats, --consumer-repeats and --max-examples must be >= 1")


# --------------------------------------------------------------------------- process memory


def process_memory(pid: int) -> dict[str, float]:
    """Resident memory now (``VmRSS``) and its peak (``VmHWM``) in MiB, from /proc/PID/status."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = round(int(rest.split()[0]) / 1024, 1)  # kB
    return {"rss_mb": values["VmRSS"], "peak_mb": values["VmHWM"]}


def reset_peak(pid: int) -> bool:
    """Reset the process's ``VmHWM`` to its current RSS (Linux ``clear_refs`` 5); False if not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class RssSampler:
    """Samples a process's RSS every ``interval_s`` in a thread; ``peak_mb`` is the highest seen."""

    def __init__(self, pid: int, interval_s: float = 0.01):
        self.pid, self.interval_s = pid, interval_s
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError, KeyError):
                self.peak_mb = max(self.peak_mb, process_memory(self.pid)["rss_mb"])
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# --------------------------------------------------------------------------- votes


@dataclass(frozen=True)
class Pair:
    """One generation as the gateway served it: what a listener may vote on, and with which token."""

    generation_id: str
    clip_ids: tuple[str, str]
    durations: tuple[float, float]
    vote_token: str
    user_id: str

    @classmethod
    def from_response(cls, body: dict[str, Any], user_id: str) -> Pair:
        a, b = body["clips"][:2]
        return cls(
            body["generation_id"],
            (a["clip_id"], b["clip_id"]),
            (float(a["duration_s"]), float(b["duration_s"])),
            body["vote_token"],
            user_id,
        )


@dataclass
class Vote:
    kind: str  # "valid" or one of FORGED_KINDS
    key: str  # "main" (the stack's key) or "other"
    body: dict[str, Any]


def valid_vote(pair: Pair, rng: np.random.Generator) -> Vote:
    """A vote the gateway must accept and the consumer must keep (both clips heard in full, a or b)."""
    return Vote(
        "valid",
        "main",
        {
            "event_id": uuid.uuid4().hex,
            "generation_id": pair.generation_id,
            "clip_a_id": pair.clip_ids[0],
            "clip_b_id": pair.clip_ids[1],
            "choice": str(rng.choice(["a", "b"])),
            "listen_a_s": pair.durations[0],
            "listen_b_s": pair.durations[1],
            "user_id": pair.user_id,
            "app_id": "reliability",
            "vote_token": pair.vote_token,
        },
    )


def random_token(rng: np.random.Generator) -> str:
    """Looks like a vote token (``v1.<payload>.<signature>``); signed by nobody."""

    def part(n: int) -> str:
        return base64.urlsafe_b64encode(rng.bytes(n)).rstrip(b"=").decode()

    return f"v1.{part(96)}.{part(32)}"


def expired_token(secret: bytes, pair: Pair, key_name: str) -> str:
    """The token the gateway (vote-token key ``secret``) gave ``pair``, but issued two hours ago with a one-hour TTL."""
    from serving.services.vote_tokens import VoteTokens

    tokens = VoteTokens(secret, ttl_s=3600, clock=lambda: time.time() - 7200)
    token, _ = tokens.issue(pair.generation_id, list(zip(pair.clip_ids, pair.durations)), key_name, pair.user_id)
    return token


def forged_vote(kind: str, target: Pair, other: Pair, rng: np.random.Generator, expired: Callable[[Pair], str]) -> Vote:
    """A vote of ``kind`` (``FORGED_KINDS``) on ``target`` (``other``: another generation) that must land nothing.

    A ``replay`` must target a pair whose valid vote was already accepted (``vote_schedule`` sees to it)."""
    vote = valid_vote(target, rng)
    vote.kind, body = kind, vote.body
    if kind == "no_token":
        del body["vote_token"]
    elif kind == "random_token":
        body["vote_token"] = random_token(rng)
    elif kind == "other_generation":
        body["vote_token"] = other.vote_token
    elif kind == "other_user":
        body["user_id"] = other.user_id
    elif kind == "other_key":
        vote.key = "other"
    elif kind == "wrong_clip":
        body["clip_b_id"] = rng.bytes(16).hex()
    elif kind == "replay":
        pass  # a new event_id (valid_vote made one) on an already counted (user, generation)
    elif kind == "listen_too_long":
        body["listen_b_s"] = round(target.durations[1] + 5.0, 3)
    elif kind == "expired":
        body["vote_token"] = expired(target)
    else:
        raise ValueError(f"unknown forged kind {kind!r}")
    return vote


def vote_schedule(n_forged: int, n_valid: int, seed: int = 0) -> list[tuple[str, int, int]]:
    """The order of a run: ``("valid", j, j)`` or ``(kind, target, other)`` with pair indices.

    Valid votes are spread evenly through the forged ones; every kind comes up in turn
    (each appears once ``n_forged >= len(FORGED_KINDS)``), in shuffled order; a replay
    only targets a pair whose valid vote has already been sent; ``other != target``
    whenever there are two pairs."""
    rng = np.random.default_rng(seed)
    kinds = [FORGED_KINDS[i % len(FORGED_KINDS)] for i in range(n_forged)]
    rng.shuffle(kinds)
    steps: list[tuple[str, int, int]] = []
    sent = 0
    for i, kind in enumerate(kinds):
        while sent < n_valid and sent * n_forged <= i * n_valid:  # the next valid vote's turn
            steps.append(("valid", sent, sent))
            sent += 1
        target = int(rng.integers(sent)) if kind == "replay" else int(rng.integers(n_valid))
        other = (target + 1 + int(rng.integers(n_valid - 1))) % n_valid if n_valid > 1 else target
        steps.append((kind, target, other))
    steps += [("valid", j, j) for j in range(sent, n_valid)]
    return steps


def landed(event_ids: set[str], valid_ids: set[str], forged_ids: set[str]) -> dict[str, int]:
    """How many of the valid and of the forged votes' event ids are in the buffer."""
    return {
        "rows_in_buffer": len(event_ids),
        "valid_landed": len(event_ids & valid_ids),
        "forged_landed": len(event_ids & forged_ids),
        "other_rows": len(event_ids - valid_ids - forged_ids),
    }


# --------------------------------------------------------------------------- decode bombs


def wav_header(sample_rate: int, channels: int, seconds: float = 10.0, data: bytes = b"") -> bytes:
    """A 16-bit PCM WAV header claiming ``seconds`` of audio, followed only by ``data``
    (as tests/unit/audio_headers.py)."""
    block = 2 * channels
    size = min(int(sample_rate * seconds) * block, 0xFFFFFFFF - 36)
    byte_rate = min(sample_rate * block, 0xFFFFFFFF)
    fmt = struct.pack("<HHIIHH", 1, channels, sample_rate, byte_rate, block % 0x10000, 16)
    return (
        b"RIFF"
        + struct.pack("<I", 36 + size)
        + b"WAVE"
        + b"fmt "
        + struct.pack("<I", 16)
        + fmt
        + b"data"
        + struct.pack("<I", size)
        + data
    )


def flac_header(sample_rate: int, channels: int, seconds: float = 10.0) -> bytes:
    """A FLAC stream of only its STREAMINFO block claiming ``seconds`` of 16-bit audio (42 bytes)."""
    total = min(int(sample_rate * seconds), (1 << 36) - 1)
    packed = (sample_rate << 44) | ((channels - 1) << 41) | (15 << 36) | total
    info = struct.pack(">HH", 4096, 4096) + bytes(6) + packed.to_bytes(8, "big") + bytes(16)
    return b"fLaC" + bytes([0x80]) + len(info).to_bytes(3, "big") + info


def real_wav(seconds: float, sample_rate: int = 16_000) -> bytes:
    """``seconds`` of quiet noise as a real 16-bit WAV."""
    from musicrl.audio.formats import encode_audio

    rng = np.random.default_rng(0)
    return encode_audio((0.05 * rng.standard_normal(int(seconds * sample_rate))).astype(np.float32), sample_rate, "wav")


@dataclass
class Bomb:
    name: str
    body: bytes | None = None  # a whole request body (JSON or not); else one item per payload in ``audio``
    audio: list[bytes] = field(default_factory=list)
    by_clip_id: bool = False  # store the audio in the clips bucket and score it by clip_id
    tokens: int = 0  # a tokens item of this length instead of audio


def bombs(max_items: int = 64, max_body_bytes: int = 64 * 2**20) -> list[Bomb]:
    """Payloads the reward service must refuse with a 4xx without decoding them (docs/reward_service.md)."""
    long_wav = real_wav(61.0, 16_000)
    return [
        Bomb("wav_4ghz_rate", audio=[wav_header(0xFFFFFFFF, 1, 0.4)]),
        Bomb("wav_1mhz_rate", audio=[wav_header(1_000_000, 1, 10.0, data=bytes(4096))]),
        Bomb("wav_65535_channels", audio=[wav_header(48_000, 65_535, 0.01, data=bytes(65_535 * 2 * 8))]),
        Bomb("wav_claims_12h", audio=[wav_header(48_000, 2, 12 * 3600, data=bytes(4096))]),
        Bomb("flac_655khz_8ch_60s", audio=[flac_header(655_350, 8, 60.0)]),
        Bomb("flac_1mhz_8ch_10h", audio=[flac_header((1 << 20) - 1, 8, 36_000.0)]),
        Bomb("flac_48k_stereo_10h", audio=[flac_header(48_000, 2, 36_000.0)]),
        Bomb(f"flac_48k_stereo_60s_x{max_items}", audio=[flac_header(48_000, 2, 59.9)] * max_items),
        Bomb("real_wav_61s", audio=[long_wav]),
        Bomb("garbage_bytes", audio=[b"RIFF" + secrets.token_bytes(2048)]),
        Bomb("clip_id_flac_655khz_8ch", audio=[flac_header(655_350, 8, 60.0)], by_clip_id=True),
        Bomb("clip_id_wav_claims_12h", audio=[wav_header(48_000, 2, 12 * 3600, data=bytes(4096))], by_clip_id=True),
        Bomb("tokens_1m", tokens=1_000_000),
        Bomb(f"items_{max_items + 1}", audio=[real_wav(1.0)] * (max_items + 1)),
        Bomb("deep_json_100k", body=b'{"items": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        Bomb(
            "body_over_limit",
            body=b'{"items": [{"prompt": "x", "audio_b64": "' + b"A" * (max_body_bytes + 2**20) + b'"}]}',
        ),
    ]


def bomb_request(bomb: Bomb, clip_ids: list[str] | None = None) -> bytes:
    """The JSON body of ``bomb`` (``clip_ids``: where its audio was stored, for ``by_clip_id``)."""
    if bomb.body is not None:
        return bomb.body
    if bomb.tokens:
        items = [{"prompt": "bomb", "tokens": [1] * bomb.tokens}]
    elif bomb.by_clip_id:
        items = [{"prompt": "bomb", "clip_id": clip_id} for clip_id in clip_ids or []]
    else:
        items = [{"prompt": "bomb", "audio_b64": base64.b64encode(data).decode()} for data in bomb.audio]
    return json.dumps({"items": items, "components": ["text_adherence", "quality"]}).encode()


# --------------------------------------------------------------------------- synthetic buffers


_PROMPTS = ("calm lo-fi piano", "fast techno with heavy bass", "sad violin solo", "upbeat jazz trio", "ambient pads")


def synthetic_chunk(
    partition: int, first_offset: int, n: int, policy: str, rng: np.random.Generator, start: datetime
) -> list[dict[str, Any]]:
    """``n`` buffer rows (``ROW_SCHEMA``) of one chunk of a partition, short token clips."""
    rows = []
    for i in range(n):
        tokens = rng.integers(0, 1024, size=(2, 4)).tolist()
        rows.append(
            {
                "event_id": uuid.UUID(bytes=rng.bytes(16)).hex,
                "generation_id": rng.bytes(16).hex(),
                "clip_a_id": rng.bytes(16).hex(),
                "clip_b_id": rng.bytes(16).hex(),
                "choice": ("a", "b", "tie")[i % 3],
                "is_tie": i % 3 == 2,
                "listen_a_s": 5.0,
                "listen_b_s": 5.0,
                "listen_a_frac": 1.0,
                "listen_b_frac": 1.0,
                "user_pseudonym": rng.bytes(32).hex(),
                "app_id": "reliability",
                "received_at": start + timedelta(seconds=first_offset + i),
                "prompt": _PROMPTS[i % len(_PROMPTS)],
                "temperature": 0.99,
                "top_k": 0,
                "policy_version": policy,
                "mixed_policy": False,
                "policy_version_a": policy,
                "policy_version_b": policy,
                "duration_a_s": 5.0,
                "duration_b_s": 5.0,
                "tokens_a": tokens[0],
                "tokens_b": tokens[1],
                "kafka_partition": partition,
                "kafka_offset": first_offset + i,
            }
        )
    return rows


def chunk_plan(n: int, partitions: int, chunk_events: int) -> list[tuple[int, int, int]]:
    """(partition, first_offset, events) of the chunks holding ``n`` votes spread evenly over ``partitions``."""
    plan = []
    for p in range(partitions):
        count = n // partitions + (1 if p < n % partitions else 0)
        for first in range(0, count, chunk_events):
            plan.append((p, first, min(chunk_events, count - first)))
    return plan


def write_synthetic_buffer(
    store, bucket: str, n: int, partitions: int, chunk_events: int, seed: int = 0, policies: int = 5
) -> dict[str, Any]:
    """A buffer of ``n`` votes as the consumer would have left it: segments and their ledger entries."""
    from feedback_consumer.ledger import Ledger, LedgerEntry
    from musicrl.buffer import rows_to_parquet, segment_key

    started = time.perf_counter()
    store.ensure_bucket(bucket)
    ledger = Ledger(store, bucket)
    plan = chunk_plan(n, partitions, chunk_events)
    start = datetime(2026, 1, 1, tzinfo=UTC)

    def write(index: int) -> int:
        p, first, count = plan[index]
        rng = np.random.default_rng([seed, index])
        policy = str(1 + index * policies // len(plan))
        rows = synthetic_chunk(p, first, count, policy, rng, start)
        key = segment_key(policy, p, first, first + count - 1)
        store.put_bytes(bucket, key, rows_to_parquet(rows))
        ledger.write(
            LedgerEntry(
                partition=p,
                first_offset=first,
                last_offset=first + count - 1,
                event_ids=[r["event_id"] for r in rows],
                segments=[key],
            )
        )
        return count

    with ThreadPoolExecutor(4) as pool:
        written = sum(pool.map(write, range(len(plan))))
    return {"votes": written, "chunks": len(plan), "write_s": round(time.perf_counter() - started, 1)}


# --------------------------------------------------------------------------- summary


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a / b, 3)


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Targets and whether each is met (None: its part did not run); ``all_met`` over those that ran."""
    targets: dict[str, dict[str, Any]] = {}
    for part in PARTS:
        if isinstance(results.get(part), dict) and "error" in results[part]:
            targets[f"{part}_completed"] = {
                "target": f"the {part} part runs to its end",
                "value": results[part]["error"],
                "met": False,
            }
            results = {k: v for k, v in results.items() if k != part}
    auth = results.get("auth")
    if auth:
        targets["writes_without_key_401"] = {
            "target": "every write route: 401 without a key or with an unknown one",
            "met": bool(auth["write_routes"])
            and all(s == 401 for row in auth["write_routes"] for s in row["statuses"].values()),
        }
        limited = auth["rate_limited"]
        targets["over_rate_429_retry_after"] = {
            "target": "a key over its rate: 429 with Retry-After",
            "met": limited["throttled"] > 0
            and limited["throttled_with_retry_after"] == limited["throttled"]
            and all(s != 429 for s in limited["statuses"][: limited["rate_per_min"]]),
        }
        narrow = auth["concurrency_limited"]
        targets["over_concurrency_429_retry_after"] = {
            "target": "a key over its concurrency cap: 429 with Retry-After",
            "met": narrow["throttled"] > 0 and narrow["throttled_with_retry_after"] == narrow["throttled"],
        }
    votes = results.get("votes")
    if votes:
        targets["forged_votes_land_0"] = {
            "target": "forged or replayed votes: 0 accepted by the gateway, 0 rows in the buffer",
            "met": votes["forged_accepted"] == 0 and votes["buffer"]["forged_landed"] == 0,
        }
        targets["valid_votes_all_land"] = {
            "target": "every valid vote sent among them: one row in the buffer",
            "met": votes["buffer"]["valid_landed"] == votes["valid"] and votes["valid_accepted"] == votes["valid"],
        }
    bombs_part = results.get("bombs")
    if bombs_part:
        targets["bombs_all_4xx"] = {
            "target": "every decode bomb: 4xx",
            "met": all(400 <= s < 500 for row in bombs_part["bombs"] for s in row["statuses"]),
        }
        targets["bomb_peak_rss_under_2x_idle"] = {
            "target": f"reward service peak RSS during the bombs < {TARGET_BOMB_RATIO:g}x idle",
            "value": bombs_part["peak_ratio_to_idle"],
            "met": bombs_part["peak_ratio_to_idle"] is not None
            and bombs_part["peak_ratio_to_idle"] < TARGET_BOMB_RATIO,
        }
    consumer = results.get("consumer")
    if consumer and len(consumer["points"]) >= 2:
        for name, label in (
            ("rss_ratio", "resident memory"),
            ("startup_ratio", "start-up time (to partitions restored)"),
        ):
            value = consumer[name]
            targets[f"consumer_{name}_within_20pct"] = {
                "target": f"consumer {label}, largest vs smallest buffer, within {TARGET_CONSUMER_SPREAD:.0%}",
                "value": value,
                "met": value is not None and value <= 1 + TARGET_CONSUMER_SPREAD,
            }
    fuzz = results.get("schemathesis")
    if fuzz:
        targets["schemathesis_no_failures"] = {
            "target": "schemathesis --checks all: no failures and no errors on both documents",
            "met": all(run.get("ran") and run["failures"] == 0 and run["errors"] == 0 for run in fuzz.values()),
        }
    met = [t["met"] for t in targets.values()]
    return {"targets": targets, "all_met": bool(met) and all(met)}


def table_rows(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(part, measure, value) rows of the printed table."""
    rows: list[tuple[str, str, str]] = []
    for part in PARTS:
        if isinstance(results.get(part), dict) and "error" in results[part]:
            rows.append((part, "FAILED", results[part]["error"][:200]))
            results = {k: v for k, v in results.items() if k != part}
    auth = results.get("auth")
    if auth:
        for row in auth["write_routes"]:
            rows.append(
                ("auth", f"{row['route']} without key / unknown key", " / ".join(map(str, row["statuses"].values())))
            )
        limited = auth["rate_limited"]
        rows.append(
            (
                "auth",
                f"key at {limited['rate_per_min']}/min, {len(limited['statuses'])} requests",
                f"{' '.join(map(str, limited['statuses']))}; Retry-After {limited['retry_after']}",
            )
        )
        narrow = auth["concurrency_limited"]
        rows.append(
            (
                "auth",
                f"key with {narrow['max_concurrency']} in flight, {len(narrow['statuses'])} at once",
                f"{' '.join(map(str, sorted(narrow['statuses'])))}; Retry-After {narrow['retry_after']}",
            )
        )
    votes = results.get("votes")
    if votes:
        for kind, statuses in votes["by_kind"].items():
            rows.append(
                ("votes", f"{kind} ({sum(statuses.values())})", ", ".join(f"{s}: {n}" for s, n in statuses.items()))
            )
        b = votes["buffer"]
        rows.append(
            (
                "votes",
                "rows in the buffer",
                f"{b['valid_landed']}/{votes['valid']} valid, {b['forged_landed']}/{votes['forged']} forged",
            )
        )
    bombs_part = results.get("bombs")
    if bombs_part:
        for row in bombs_part["bombs"]:
            rows.append(
                (
                    "bombs",
                    row["name"],
                    " ".join(map(str, row["statuses"]))
                    + (f"; peak {row['peak_mb']} MiB" if row.get("peak_mb") is not None else ""),
                )
            )
        rows.append(
            (
                "bombs",
                "reward RSS idle -> peak during bombs",
                f"{bombs_part['idle_rss_mb']} -> {bombs_part['peak_rss_mb']} MiB (x{bombs_part['peak_ratio_to_idle']})",
            )
        )
    consumer = results.get("consumer")
    if consumer:
        for point in consumer["points"]:
            rows.append(
                (
                    "consumer",
                    f"{point['votes']:,} votes ({point['chunks']} chunks)",
                    f"RSS {point['rss_mb']} MiB, peak {point['peak_mb']} MiB, healthy {point['healthy_s']} s, "
                    f"restored {point['restored_s']} s, {point['known_event_ids']:,} ids loaded"
                    + (f" (ledger read alone {point['ledger_read_s']} s)" if "ledger_read_s" in point else ""),
                )
            )
        rows.append(
            ("consumer", "largest / smallest", f"RSS x{consumer['rss_ratio']}, start-up x{consumer['startup_ratio']}")
        )
    for name, run in (results.get("schemathesis") or {}).items():
        kinds = ", ".join(f"{k['code']} {' '.join(k['operations'] or [])}" for k in run.get("failure_kinds", []))
        rows.append(
            (
                "schemathesis",
                name,
                f"{run.get('cases')} cases, {run.get('failures')} failures"
                + (f" ({kinds})" if kinds else "")
                + f", {run.get('errors')} errors"
                + ("" if run.get("ran") else f" ({run.get('note')})"),
            )
        )
    for name, target in results.get("summary", {}).get("targets", {}).items():
        rows.append(("target", name, "met" if target["met"] else "NOT MET"))
    return rows


# --------------------------------------------------------------------------- the stack


@dataclass
class Keys:
    """The extra API keys of the private gateway, and its vote-token secret."""

    limited: str = field(default_factory=lambda: "mrl_" + secrets.token_urlsafe(24))
    narrow: str = field(default_factory=lambda: "mrl_" + secrets.token_urlsafe(24))
    other: str = field(default_factory=lambda: "mrl_" + secrets.token_urlsafe(24))
    vote_secret: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    admin_token: str = field(default_factory=lambda: secrets.token_urlsafe(32))

    def gateway_env(self, stack_entry: str, limited_rate: int) -> dict[str, str]:
        def entry(name: str, key: str, limits: str) -> str:
            return f"{name}:{hashlib.sha256(key.encode()).hexdigest()}{limits}"

        entries = [
            stack_entry,
            entry(LIMITED_KEY, self.limited, f":{limited_rate}:8"),
            entry(NARROW_KEY, self.narrow, ":6000:1"),
            entry(OTHER_KEY, self.other, ":6000:64"),
        ]
        return {
            "MUSICRL_GATEWAY_API_KEYS": ",".join(entries),
            "MUSICRL_GATEWAY_VOTE_TOKEN_KEY": self.vote_secret,
            # Shorter clips than the default 30 s bound what schemathesis's generations cost on a CPU.
            "MUSICRL_GATEWAY_MAX_DURATION_S": str(GATEWAY_MAX_DURATION_S),
            "MUSICRL_GATEWAY_DEFAULT_DURATION_S": str(GATEWAY_MAX_DURATION_S),
        }

    def reward_env(self) -> dict[str, str]:
        # The admin API enabled, so that schemathesis checks its authentication (401), not its absence (403).
        return {"MUSICRL_REWARD_ADMIN_TOKEN": self.admin_token}


@contextlib.contextmanager
def reliability_stack(work_dir: Path, config: ReliabilityConfig, keys: Keys) -> Iterator[Any]:
    """``private_loop_stack`` whose gateway also knows ``keys`` (and signs vote tokens with their secret)."""
    from loadtests.closed_loop import private_loop_stack
    from musicrl.stack.stack import StackInfo

    def gateway_env(settings) -> dict[str, str]:
        return keys.gateway_env(StackInfo(settings).env()["MUSICRL_GATEWAY_API_KEYS"], config.limited_rate_per_min)

    with private_loop_stack(work_dir, service_env={"gateway": gateway_env, "reward": keys.reward_env()}) as info:
        yield info


def service_pid(info, name: str) -> int:
    from musicrl.stack.processes import RunDir, Supervisor

    running = Supervisor(RunDir(info.data_dir)).running(name)
    if running is None:
        raise RuntimeError(f"{name} is not running")
    return running.pid


def generate_pairs(
    gateway_url: str, api_key: str, n: int, clip_s: float, seed: int, progress: Progress, concurrency: int = 2
) -> list[Pair]:
    """``n`` generations, each for its own user: the pairs the votes are about."""

    def one(i: int) -> Pair:
        user = f"reliability-user-{seed}-{i}"
        with httpx.Client(base_url=gateway_url, timeout=300, headers={"Authorization": f"Bearer {api_key}"}) as http:
            response = http.post(
                "/v1/generations",
                json={
                    "prompt": _PROMPTS[i % len(_PROMPTS)],
                    "duration_s": clip_s,
                    "seed": seed * 100_000 + i,
                    "user_id": user,
                    "app_id": "reliability",
                },
            )
            response.raise_for_status()
        if (i + 1) % 10 == 0 or i + 1 == n:
            progress(f"votes: {i + 1}/{n} generations")
        return Pair.from_response(response.json(), user)

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, range(n)))


# --------------------------------------------------------------------------- the parts


def run_auth(info, keys: Keys, config: ReliabilityConfig, progress: Progress) -> dict[str, Any]:
    with httpx.Client(base_url=info.gateway_url, timeout=300) as http:
        document = http.get("/openapi.json").json()
        routes = sorted(
            (method.upper(), path)
            for path, ops in document["paths"].items()
            for method in ops
            if method in ("post", "put", "patch", "delete")
        )
        bodies = {
            "/v1/generations": {"prompt": "calm piano", "duration_s": config.clip_s},
            "/v1/feedback": {
                "event_id": uuid.uuid4().hex,
                "generation_id": "0" * 32,
                "clip_a_id": "1" * 32,
                "clip_b_id": "2" * 32,
                "choice": "a",
                "listen_a_s": 1.0,
                "listen_b_s": 1.0,
                "user_id": "u",
                "vote_token": "v1.e30.e30",
            },
        }
        write_routes = []
        for method, path in routes:
            body = bodies.get(path, {})
            statuses, authenticate = {}, {}
            for label, headers in (
                ("no key", {}),
                ("unknown key", {"Authorization": "Bearer mrl_unknown"}),
                ("unknown X-API-Key", {"X-API-Key": "mrl_unknown"}),
            ):
                response = http.request(method, path, json=body, headers=headers)
                statuses[label] = response.status_code
                authenticate[label] = response.headers.get("WWW-Authenticate")
            write_routes.append({"route": f"{method} {path}", "statuses": statuses, "www_authenticate": authenticate})
        progress(
            f"auth: {len(write_routes)} write routes without a key: "
            + ", ".join(f"{r['route']} {list(r['statuses'].values())}" for r in write_routes)
        )

        # A key over its rate: the bucket holds a minute's worth (rate_per_min), then 429.
        rate = config.limited_rate_per_min
        statuses, retry_after = [], []
        for i in range(rate + 2):
            response = http.post(
                "/v1/generations",
                json={"prompt": f"limited {i}", "duration_s": config.clip_s},
                headers={"Authorization": f"Bearer {keys.limited}"},
            )
            statuses.append(response.status_code)
            if response.status_code == 429:
                retry_after.append(response.headers.get("Retry-After"))
        limited = {
            "rate_per_min": rate,
            "statuses": statuses,
            "throttled": statuses.count(429),
            "throttled_with_retry_after": sum(r is not None for r in retry_after),
            "retry_after": retry_after,
        }
        progress(f"auth: key at {rate}/min: {statuses}, Retry-After {retry_after}")

    # A key with one request in flight: four at once, each a few seconds of audio.
    def concurrent(i: int) -> tuple[int, str | None]:
        with httpx.Client(base_url=info.gateway_url, timeout=300) as client:
            response = client.post(
                "/v1/generations",
                json={"prompt": f"narrow {i}", "duration_s": 3.0},
                headers={"Authorization": f"Bearer {keys.narrow}"},
            )
            return response.status_code, response.headers.get("Retry-After")

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(concurrent, range(4)))
    narrow = {
        "max_concurrency": 1,
        "statuses": [s for s, _ in answers],
        "throttled": sum(s == 429 for s, _ in answers),
        "throttled_with_retry_after": sum(s == 429 and r is not None for s, r in answers),
        "retry_after": [r for s, r in answers if s == 429],
    }
    progress(f"auth: key with 1 in flight, 4 at once: {narrow['statuses']}")
    return {"write_routes": write_routes, "rate_limited": limited, "concurrency_limited": narrow}


def run_votes(info, keys: Keys, config: ReliabilityConfig, progress: Progress) -> dict[str, Any]:
    from musicrl.buffer import PreferenceBuffer
    from musicrl.config import ObjectStoreConfig
    from musicrl.storage import ObjectStore

    started = time.monotonic()
    pairs = generate_pairs(info.gateway_url, info.api_key, config.valid, config.clip_s, config.seed, progress)
    rng = np.random.default_rng(config.seed)
    secret = keys.vote_secret.encode()
    steps = vote_schedule(config.forged, config.valid, config.seed)
    by_kind: dict[str, Counter] = {kind: Counter() for kind in ("valid", *FORGED_KINDS)}
    valid_ids: set[str] = set()
    forged_ids: set[str] = set()
    forged_accepted: list[dict[str, Any]] = []
    headers = {"main": {"Authorization": f"Bearer {info.api_key}"}, "other": {"Authorization": f"Bearer {keys.other}"}}
    with httpx.Client(base_url=info.gateway_url, timeout=60) as http:
        for n, (kind, target, other) in enumerate(steps, 1):
            if kind == "valid":
                vote = valid_vote(pairs[target], rng)
            else:
                vote = forged_vote(
                    kind, pairs[target], pairs[other], rng, lambda pair: expired_token(secret, pair, "stack")
                )
            response = http.post("/v1/feedback", json=vote.body, headers=headers[vote.key])
            by_kind[kind][response.status_code] += 1
            (valid_ids if kind == "valid" else forged_ids).add(vote.body["event_id"])
            if kind != "valid" and response.status_code < 300:
                forged_accepted.append({"kind": kind, "status": response.status_code, "body": response.text[:300]})
            if n % 200 == 0 or n == len(steps):
                progress(
                    f"votes: {n}/{len(steps)} sent; valid {dict(by_kind['valid'])}, "
                    f"forged accepted {len(forged_accepted)}"
                )
    sent_s = time.monotonic() - started

    store = ObjectStore(info.settings_for(ObjectStoreConfig))
    buffer = PreferenceBuffer(store, info.settings.bucket_buffer)
    progress("votes: waiting for the consumer to settle")
    event_ids = settled_event_ids(buffer, expected=by_kind["valid"][202])
    counts = landed(event_ids, valid_ids, forged_ids)
    progress(f"votes: buffer holds {counts['valid_landed']}/{config.valid} valid, {counts['forged_landed']} forged")
    return {
        "forged": config.forged,
        "valid": config.valid,
        "by_kind": {k: dict(sorted(v.items())) for k, v in by_kind.items() if v},
        "by_status_forged": dict(sorted(sum((v for k, v in by_kind.items() if k != "valid"), Counter()).items())),
        "valid_accepted": by_kind["valid"][202],
        "forged_accepted": len(forged_accepted),
        "forged_accepted_examples": forged_accepted[:5],
        "buffer": counts,
        "seconds": round(sent_s, 1),
    }


def settled_event_ids(buffer, expected: int, timeout_s: float = 180.0, settle_s: float = 10.0) -> set[str]:
    """The buffer's event ids once it holds ``expected`` rows (or more) and has not changed for ``settle_s``."""
    deadline = time.monotonic() + timeout_s
    last: set[str] | None = None
    stable_since = time.monotonic()
    while time.monotonic() < deadline:
        ids = set(buffer.read(columns=["event_id"]).column("event_id").to_pylist()) if buffer.segments() else set()
        if ids != last:
            last, stable_since = ids, time.monotonic()
        elif len(ids) >= expected and time.monotonic() - stable_since >= settle_s:
            return ids
        time.sleep(1.0)
    return last or set()


def run_bombs(info, config: ReliabilityConfig, progress: Progress) -> dict[str, Any]:
    from musicrl.config import ObjectStoreConfig
    from musicrl.storage import ObjectStore
    from reward_service.settings import RewardSettings

    settings = info.settings_for(RewardSettings)
    pid = service_pid(info, "reward")
    store = ObjectStore(info.settings_for(ObjectStoreConfig))
    with httpx.Client(base_url=info.reward_url, timeout=300) as http:
        warm = {
            "items": [{"prompt": "calm piano", "audio_b64": base64.b64encode(real_wav(2.0)).decode()}],
            "components": ["text_adherence", "quality"],
        }
        for _ in range(2):  # the first scores load what is lazy (sessions, caches): idle is after them
            http.post("/v1/scores", json=warm).raise_for_status()
        time.sleep(2.0)
        idle = process_memory(pid)
        reset = reset_peak(pid)
        rows = []
        with RssSampler(pid) as sampler:
            for bomb in bombs(settings.reward_max_items, settings.reward_max_body_bytes):
                clip_ids = None
                if bomb.by_clip_id:
                    clip_ids = [uuid.uuid4().hex for _ in bomb.audio]
                    for clip_id, data in zip(clip_ids, bomb.audio):
                        store.put_bytes(info.settings.bucket_clips, f"clips/{clip_id}.wav", data, "audio/wav")
                body = bomb_request(bomb, clip_ids)
                statuses, details, seconds = [], [], []
                if reset:
                    reset_peak(pid)  # this bomb's own peak; the overall one is the largest of them
                for _ in range(config.bomb_repeats):
                    t0 = time.perf_counter()
                    try:
                        response = http.post("/v1/scores", content=body, headers={"Content-Type": "application/json"})
                        statuses.append(response.status_code)
                        details.append(response.text[:160])
                    except httpx.HTTPError as err:  # a server may close the connection on a body it refuses
                        statuses.append(-1)
                        details.append(f"{type(err).__name__}: {err}"[:160])
                    seconds.append(time.perf_counter() - t0)
                bomb_peak = process_memory(pid)["peak_mb"] if reset else None
                rows.append(
                    {
                        "name": bomb.name,
                        "request_bytes": len(body),
                        "statuses": statuses,
                        "detail": details[0],
                        "max_s": round(max(seconds), 3),
                        "peak_mb": bomb_peak,
                    }
                )
                progress(
                    f"bombs: {bomb.name} ({len(body):,} bytes): {statuses}, peak {bomb_peak} MiB; {details[0][:100]}"
                )
        after = process_memory(pid)
        healthy = http.get("/healthz").status_code
    peak = max([after["peak_mb"] if reset else 0.0, sampler.peak_mb] + [r["peak_mb"] or 0.0 for r in rows])
    return {
        "pid": pid,
        "idle_rss_mb": idle["rss_mb"],
        "peak_before_mb": idle["peak_mb"],
        "peak_reset": reset,
        "peak_rss_mb": peak,
        "sampled_peak_mb": sampler.peak_mb,
        "rss_after_mb": after["rss_mb"],
        "peak_ratio_to_idle": _ratio(peak, idle["rss_mb"]),
        "healthy_after": healthy == 200,
        "bombs": rows,
        "note": "idle: RSS after two warm-up scores; peak: the larger of VmHWM (reset with clear_refs before each "
        "bomb, read after its requests: each bomb's peak_mb) and an RSS sampler every 10 ms",
    }


def consumer_start(info, bucket: str, topic: str, group: str, partitions: int, log_path: Path) -> dict[str, Any]:
    """Start ``musicrl consumer run`` on ``bucket``; seconds until healthy and until every partition is restored
    (its ledger read), and its memory 3 s later. The process is stopped before returning."""
    from musicrl.stack.processes import free_port, serve_process

    port = free_port()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.unlink(missing_ok=True)
    env = (
        os.environ
        | info.env()
        | {
            "MUSICRL_BUCKET_BUFFER": bucket,
            "MUSICRL_TOPIC_PREFERENCES": topic,
            "MUSICRL_TOPIC_DEAD_LETTER": f"{topic}.dlq",
            "MUSICRL_CONSUMER_GROUP_ID": group,
            "MUSICRL_CONSUMER_METRICS_HOST": "127.0.0.1",
            "MUSICRL_CONSUMER_METRICS_PORT": str(port),
            "MUSICRL_CONSUMER_SESSION_TIMEOUT_MS": "3000",
            "MUSICRL_CONSUMER_HEARTBEAT_INTERVAL_MS": "1000",
            "MUSICRL_LOG_LEVEL": "INFO",
            "MUSICRL_LOG_JSON": "true",
        }
    )
    health = f"http://127.0.0.1:{port}/healthz"
    t0 = time.perf_counter()
    with serve_process(
        [sys.executable, "-m", "musicrl.cli", "consumer", "run"],
        health,
        name=f"consumer ({bucket})",
        env=env,
        cwd=ROOT,
        log_path=log_path,
        timeout_s=300,
    ) as process:
        healthy_s = time.perf_counter() - t0
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if len(httpx.get(health, timeout=5).json()["partitions"]) >= partitions:
                break
            time.sleep(0.05)
        else:
            raise TimeoutError(f"consumer ({bucket}): partitions not restored after 300 s")
        restored_s = time.perf_counter() - t0
        time.sleep(3.0)
        memory = process_memory(process.pid)
    known = sum(
        int(line.get("known_event_ids", 0))
        for line in _json_lines(log_path)
        if line.get("event") == "partition_assigned"
    )
    return {"healthy_s": round(healthy_s, 2), "restored_s": round(restored_s, 2), **memory, "known_event_ids": known}


def run_consumer(info, config: ReliabilityConfig, work_dir: Path, progress: Progress) -> dict[str, Any]:
    from feedback_consumer.ledger import Ledger
    from feedback_consumer.settings import ConsumerSettings
    from musicrl.config import ObjectStoreConfig
    from musicrl.storage import ObjectStore

    store = ObjectStore(info.settings_for(ObjectStoreConfig))
    partitions = info.settings.topic_partitions
    window = info.settings_for(ConsumerSettings).consumer_dedup_window_offsets
    points = []
    for n in config.buffer_sizes:
        bucket = f"reliability-buffer-{n}"
        progress(
            f"consumer: writing a buffer of {n:,} votes ({config.chunk_events} per chunk, {partitions} partitions)"
        )
        written = write_synthetic_buffer(store, bucket, n, partitions, config.chunk_events, config.seed)
        progress(f"consumer: {written['chunks']} chunks written in {written['write_s']} s")
        t0 = time.perf_counter()  # the ledger read alone, as the consumer does it on assignment
        loaded = sum(
            len(e.event_ids) for p in range(partitions) for e in Ledger(store, bucket).load_partition(p, window)
        )
        ledger_s = time.perf_counter() - t0
        runs = []
        for k in range(config.consumer_repeats):
            run = consumer_start(
                info,
                bucket,
                f"reliability.{n}.{k}",
                f"reliability-{n}-{k}",
                partitions,
                work_dir / f"consumer-{n}-{k}.log",
            )
            progress(
                f"consumer: {n:,} votes, start {k + 1}/{config.consumer_repeats}: healthy {run['healthy_s']} s, "
                f"restored {run['restored_s']} s, RSS {run['rss_mb']} MiB (peak {run['peak_mb']}), "
                f"{run['known_event_ids']:,} event ids loaded"
            )
            runs.append(run)
        point = {
            "votes": n,
            **written,
            "ledger_event_ids": loaded,
            "ledger_read_s": round(ledger_s, 2),
            **{
                key: float(np.median([r[key] for r in runs]))
                for key in ("healthy_s", "restored_s", "rss_mb", "peak_mb")
            },
            "known_event_ids": runs[0]["known_event_ids"],
            "starts": runs,
        }
        points.append(point)
        for key in store.list_keys(bucket):
            store.delete(bucket, key)
    smallest, largest = min(points, key=lambda p: p["votes"]), max(points, key=lambda p: p["votes"])
    return {
        "points": points,
        "rss_ratio": _ratio(largest["rss_mb"], smallest["rss_mb"]),
        "peak_ratio": _ratio(largest["peak_mb"], smallest["peak_mb"]),
        "startup_ratio": _ratio(largest["restored_s"], smallest["restored_s"]),
        "note": "synthetic Parquet segments and their ledger entries (the consumer's de-duplication state), "
        "written straight into a bucket of their own; a fresh topic per start, so the newest entry of each "
        "partition is a pending redo; start-up: process start to all partitions restored (group joined, "
        "ledger read); RSS 3 s later; medians of the starts",
    }


def _json_lines(path: Path) -> Iterator[dict[str, Any]]:
    with contextlib.suppress(FileNotFoundError):
        for line in path.read_text(errors="replace").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                value = json.loads(line)
                if isinstance(value, dict):
                    yield value


def run_schemathesis(info, config: ReliabilityConfig, work_dir: Path, progress: Progress) -> dict[str, Any]:
    executable = Path(sys.executable).with_name("schemathesis")
    results = {}
    for name, url in (("gateway", info.gateway_url), ("reward_service", info.reward_url)):
        if not executable.exists():
            results[name] = {"ran": False, "note": "schemathesis is not installed (pip install -e '.[dev]')"}
            continue
        report_dir = work_dir / f"schemathesis-{name}"
        report = report_dir / "report.json"
        report.unlink(missing_ok=True)
        argv = [
            str(executable),
            "run",
            f"{url}/openapi.json",
            "--checks",
            "all",
            "--max-examples",
            str(config.max_examples),
            "--seed",
            str(config.seed),
            "--workers",
            "1",
            "--request-timeout",
            "120",
            "-H",
            f"Authorization: Bearer {info.api_key}",
            "--report",
            "json",
            "--report-dir",
            str(report_dir),
            "--report-json-path",
            str(report),
            "--no-color",
        ]
        progress(f"schemathesis: {name} ({url}/openapi.json, --max-examples {config.max_examples})")
        t0 = time.monotonic()
        report_dir.mkdir(parents=True, exist_ok=True)
        output = report_dir / "output.txt"
        with output.open("w") as log:
            try:
                code = subprocess.run(
                    argv,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=work_dir,
                    env=schemathesis_env(),
                    timeout=config.schemathesis_timeout_s,
                ).returncode
            except subprocess.TimeoutExpired:
                code = 124
        results[name] = parse_schemathesis(report, code) | {
            "seconds": round(time.monotonic() - t0, 1),
            "output": str(output.relative_to(ROOT) if output.is_relative_to(ROOT) else output),
        }
        progress(
            f"schemathesis: {name}: {results[name].get('cases')} cases, {results[name].get('failures')} failures, "
            f"{results[name].get('errors')} errors"
        )
    return results


def schemathesis_env() -> dict[str, str]:
    """Schemathesis with the project's hooks (a generator of real audio files for ``audio-base64``)."""
    path = os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))
    return {**os.environ, "SCHEMATHESIS_HOOKS": "loadtests.schemathesis_hooks", "PYTHONPATH": path}


def parse_schemathesis(report: Path, exit_code: int) -> dict[str, Any]:
    """Cases, failures (with their codes and operations) and errors from schemathesis's JSON report."""
    try:
        data = json.loads(report.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {"ran": False, "exit_code": exit_code, "note": "no JSON report"}
    cases = data.get("test_cases", {})
    failures = data.get("failures", [])
    return {
        "ran": True,
        "exit_code": exit_code,
        "operations": data.get("operations", {}).get("tested"),
        "cases": cases.get("generated"),
        "failures": max(cases.get("unique_failures", 0), len(failures)),
        "cases_with_failures": cases.get("with_failures", 0),
        "errors": len(data.get("errors", [])),
        "failure_kinds": [
            {k: f.get(k) for k in ("code", "title", "count", "operations")} for f in data.get("failures", [])
        ],
        "error_details": [str(e)[:300] for e in data.get("errors", [])][:5],
    }


# --------------------------------------------------------------------------- the experiment


def run_reliability(config: ReliabilityConfig, work_dir: Path, progress: Progress = print) -> dict[str, Any]:
    from loadtests.closed_loop import machine

    config.validate()
    started = time.monotonic()
    results: dict[str, Any] = {
        "benchmark": "reliability",
        "config": asdict(config),
        "machine": machine(),
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    with contextlib.suppress(OSError):
        results["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    keys = Keys()
    work_dir = work_dir.resolve()  # schemathesis runs in it and is given paths under it
    work_dir.mkdir(parents=True, exist_ok=True)
    progress("starting a private stack (SeaweedFS, Tansu, Triton, reward service, gateway, consumer)")
    with reliability_stack(work_dir, config, keys) as info:
        progress(f"stack up: gateway {info.gateway_url}, reward service {info.reward_url}")
        parts: dict[str, Callable[[], dict[str, Any]]] = {
            "auth": lambda: run_auth(info, keys, config, progress),
            "votes": lambda: run_votes(info, keys, config, progress),
            "bombs": lambda: run_bombs(info, config, progress),
            "schemathesis": lambda: run_schemathesis(info, config, work_dir, progress),
            "consumer": lambda: run_consumer(info, config, work_dir, progress),
        }
        for name, run in parts.items():  # schemathesis after the votes: its requests must not touch their buffer
            if name in config.parts:
                t0 = time.monotonic()
                try:
                    results[name] = run()
                except Exception as err:  # noqa: BLE001 - one part failing must not lose the others' figures
                    log.exception("part_failed", part=name)
                    progress(f"{name}: FAILED: {type(err).__name__}: {err}")
                    results[name] = {"error": f"{type(err).__name__}: {err}"[:1000]}
                results.setdefault("seconds", {})[name] = round(time.monotonic() - t0, 1)
    results["seconds"]["total"] = round(time.monotonic() - started, 1)
    results["summary"] = summarize(results)
    return results


def write_results(results: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return path
