"""Canary by preference against the real Triton and object store of the test stack: the candidate is served
as a challenger model beside the current one, then promoted by a hot swap or retired (docs/canary.md).

The votes are written into a buffer bucket of the test's own in the consumer's layout (the path from the
gateway through Kafka is exercised by ``musicrl experiment canary``)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
import tritonclient.http as httpclient
from buffer_helpers import vote_row
from test_finetune_deploy import _publish, _served_version, deployer  # noqa: F401 - the fixture

from finetune_worker.canary import CanaryRunner
from finetune_worker.settings import FinetuneSettings
from musicrl.buffer import PreferenceBuffer, rows_to_parquet, segment_key
from serving.services.experiments import arm_of_canary

pytestmark = pytest.mark.integration


def _votes(
    buffer: PreferenceBuffer, experiment: str, candidate: str, baseline: str, outcomes: list[str], offset: int
) -> None:
    now = datetime.now(UTC)
    rows = []
    for i, outcome in enumerate(outcomes):
        first_is_candidate = i % 2 == 0  # the gateway shuffles positions
        version_a, version_b = (candidate, baseline) if first_is_candidate else (baseline, candidate)
        choice = "tie" if outcome == "tie" else ("a" if (outcome == "win") == first_is_candidate else "b")
        received = now + timedelta(milliseconds=i)
        rows.append(
            vote_row(
                event_id=uuid.uuid4().hex,
                generation_id=uuid.uuid4().hex,
                choice=choice,
                received=received,
                version_a=version_a,
                version_b=version_b,
                offset=offset + i,
                experiment=experiment,
                policy_version=candidate,
            )
        )
    key = segment_key(candidate, 0, offset, offset + len(rows) - 1)
    buffer.store.put_bytes(buffer.bucket, key, rows_to_parquet(rows))


def _ready(stack, name: str, version: str = "") -> bool:
    client = httpclient.InferenceServerClient(stack.triton_http_url)
    try:
        return bool(client.is_model_ready(name, version))
    except Exception:  # noqa: BLE001 - unknown model
        return False
    finally:
        client.close()


@pytest.mark.parametrize("winning", [True, False], ids=["promoted", "rolled_back"])
def test_canary_serves_the_challenger_then_promotes_or_retires_it(stack, object_store, deployer, tmp_path, winning):  # noqa: F811
    registry = deployer.registry
    buffer_bucket = f"test-canary-buffer-{uuid.uuid4().hex[:8]}"
    object_store.client.make_bucket(buffer_bucket)
    buffer = PreferenceBuffer(object_store, bucket=buffer_bucket)
    first, second = _publish(registry, tmp_path, 0), _publish(registry, tmp_path, 1)
    deployer.deploy(first)
    challenger = f"{deployer.model_name}_challenger"
    settings = FinetuneSettings(
        finetune_promotion="canary",
        finetune_canary_model_name=challenger,
        finetune_canary_max_votes=200,
        finetune_canary_max_s=300,
    )
    polls = []

    def land_votes(_seconds: float) -> None:  # between polls, as the consumer would, the users' next votes land
        polls.append(1)
        outcomes = (["win"] * 4 + ["loss"]) if winning else (["loss"] * 4 + ["win"])
        _votes(buffer, record["experiment"], second, first, outcomes * 4, offset=100 * len(polls))

    runner = CanaryRunner(settings, registry, buffer, deployer, sleep=land_votes, poll_s=0.0)
    record = runner.start(second, first, run_id="it")
    try:
        # Both are served at once: the current model still gives version 1, the challenger version 2.
        assert _served_version(stack, deployer.model_name) == first
        assert _served_version(stack, challenger) == second
        assert arm_of_canary(registry.canary("generator")).challenger_model == challenger
        final = runner.run(record)
    finally:
        deployer.retire_challenger(challenger)  # idempotent; leaves nothing loaded whatever happened
    assert final["state"] == ("promoted" if winning else "rolled_back")
    assert _served_version(stack, deployer.model_name) == (second if winning else first)
    assert registry.current("generator") == (second if winning else first)
    assert not _ready(stack, challenger)
    assert [r["state"] for r in registry.canaries("generator")] == [final["state"]]
    assert len(polls) >= 1 and final["votes"]["decided"] > 0
