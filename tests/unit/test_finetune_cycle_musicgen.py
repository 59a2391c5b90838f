"""One whole finetuning cycle on a tiny MusicGen parent (issue 15), no servers: an in-memory object store holds the
registry and the buffer (multi-codebook rows as the consumer writes them), a ``python:`` reward function scores
the rollouts' codes. Stage U: the preference reward model is fitted on the buffer (the probe, on the MusicGen
decoder's pooled states) and published, REINFORCE optimises it for a few steps, the gate compares the snapshots with
the parent and the chosen one is published to the registry as a MusicGen version."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from feedback_helpers import InMemoryStore
from finetune_helpers import FRAMES, MUSICGEN_CYCLE, one_thread  # noqa: F401 - fixture
from finetune_helpers import MUSICGEN_PROMPTS as PROMPTS
from finetune_helpers import musicgen_buffer_rows as _buffer_rows
from pretrained_helpers import tiny_musicgen

from finetune_worker.cycle import GENERATOR, PREFERENCE, PREFERENCE_MUSICGEN, FinetuneCycle
from finetune_worker.reward_model import pairs_from_rows
from finetune_worker.settings import FinetuneSettings
from finetune_worker.trainers.dpo import pairs_from_buffer
from musicrl.buffer import rows_to_parquet, segment_key
from musicrl.models.musicgen import MusicgenPolicy
from musicrl.models.policy import load_policy
from musicrl.models.preference_musicgen import MusicgenPreferenceModel, load_musicgen_preference_model
from musicrl.registry import Registry

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def parent_dir(tmp_path_factory):
    return tiny_musicgen(tmp_path_factory.mktemp("musicgen") / "base", guidance_scale=3.0)


@pytest.fixture
def cycle(tmp_path, parent_dir) -> FinetuneCycle:
    settings = FinetuneSettings(finetune_work_dir=tmp_path / "work", finetune_auto_deploy=False, **MUSICGEN_CYCLE)
    store = InMemoryStore()
    registry = Registry(store, bucket=settings.bucket_models)
    registry.set_current(GENERATOR, registry.publish(GENERATOR, parent_dir))
    rows = _buffer_rows(load_policy(parent_dir), 64)
    store.put_bytes(settings.bucket_buffer, segment_key("1", 0, 0, len(rows) - 1), rows_to_parquet(rows))
    return FinetuneCycle(settings, store=store)


def test_one_cycle_on_a_musicgen_parent_fits_the_reward_model_trains_gates_and_publishes(cycle):
    record = cycle.run_once()
    registry = cycle.registry

    # the preference reward model: fitted on the [4, T] pairs, from the parent's decoder, published under its own kind
    reward_model = record["reward_model"]
    assert reward_model["fit"] == "probe" and reward_model["kind"] == PREFERENCE_MUSICGEN, reward_model
    assert reward_model["published"] == "1" and reward_model["heldout_accuracy"] > 0.6, reward_model
    assert (
        registry.current(PREFERENCE_MUSICGEN) == "1" and registry.current(PREFERENCE) is None
    )  # the service's kind untouched
    assert registry.manifest(PREFERENCE_MUSICGEN, "1")["lineage"]["run_id"] == record["run_id"]

    # REINFORCE optimised that model's score (stage U), scored in the worker on the rollouts' codes
    assert record["reward_versions"]["preference"] == "1"
    assert record["train_history_last"]["step"] == 4 and record["train_history_last"]["kl"] > 0

    # the gate chose a snapshot and the registry holds it as a MusicGen version of the generator
    assert record["status"] == "published", record.get("reason")
    gate = record["gate"]
    assert [c["step"] for c in gate["checkpoints"]] == [2, 4] and gate["passed"]
    assert gate["candidate"]["reward"] > gate["baseline"]["reward"]
    assert registry.versions(GENERATOR) == ["1", "2"] and registry.current(GENERATOR) == "1"  # auto-deploy off
    lineage = registry.manifest(GENERATOR, "2")["lineage"]
    assert (
        lineage["parent_version"] == "1"
        and lineage["stage"] == "U"
        and lineage["reward_model_versions"]["preference"] == "1"
    )
    assert (
        lineage["training_config"]["n_frames"] == FRAMES
    )  # sized in MusicGen's own frames (50/s), not the codec's 8/s
    published = load_policy(registry.download(GENERATOR, "2", cycle.work_dir / "check"))
    parent = load_policy(cycle.work_dir / "runs" / record["run_id"] / "reward_model" / "trunk")
    assert isinstance(published, MusicgenPolicy) and published.guidance_scale == 3.0
    moved = [
        not torch.equal(a, b) for a, b in zip(published.model.decoder.parameters(), parent.model.decoder.parameters())
    ]
    assert any(moved)  # the decoder was trained ...
    assert all(
        torch.equal(a, b)
        for a, b in zip(published.model.text_encoder.parameters(), parent.model.text_encoder.parameters())
    )


def test_the_musicgen_reward_model_reads_multi_codebook_rows_and_ranks_held_out_pairs(cycle, parent_dir, tmp_path):
    policy = load_policy(parent_dir)
    rows = _buffer_rows(policy, 64)
    pairs = pairs_from_rows(rows, None, num_codebooks=4)
    assert (
        len(pairs.pairs) == 64 and pairs.pairs[0].preferred.shape == (4, FRAMES) and pairs.pairs[0].prompt == PROMPTS[0]
    )
    assert pairs_from_rows(rows, None).pairs == []  # a one-codebook reader leaves another kind's clips out
    # the same clip read back: codebook 0 first, as the policy sampled it
    a = policy.sample(policy.condition([PROMPTS[0]]), FRAMES, 1.5, 0, seeds=[0])[0][0].numpy()
    first = rows[0]
    assert np.array_equal(pairs.pairs[0].preferred if first["choice"] != "b" else pairs.pairs[0].other, a)

    from musicrl.models.preference import fit_preference_heads

    model = MusicgenPreferenceModel.from_policy(policy, n_heads=2, disagreement_penalty=0.5)
    metrics = fit_preference_heads(model, pairs.pairs, l2=1.0, folds=4)
    assert metrics["cv_accuracy"] > 0.6 and metrics["n_cv_decided"] == sum(not p.tie for p in pairs.pairs)
    # the trunk is the policy's decoder, frozen; the policy itself untouched
    assert all(
        torch.equal(a, b) for a, b in zip(model.trunk.model.decoder.parameters(), policy.model.decoder.parameters())
    )
    assert not any(p.requires_grad for p in model.trunk.parameters())
    # the served score ranks fresh pairs by the listeners' taste, and survives a save and load
    fresh = pairs_from_rows(_buffer_rows(policy, 40, version="1")[20:], None, num_codebooks=4)
    decided = [p for p in fresh.pairs if not p.tie]
    scores_preferred = model.score([p.prompt for p in decided], [p.preferred for p in decided])
    scores_other = model.score([p.prompt for p in decided], [p.other for p in decided])
    assert np.mean(scores_preferred > scores_other) > 0.6
    loaded, meta = load_musicgen_preference_model(model.save(tmp_path / "rm", {"note": "x"}))
    assert meta["note"] == "x" and (loaded.n_heads, loaded.disagreement_penalty) == (2, 0.5)
    np.testing.assert_allclose(
        loaded.score([p.prompt for p in decided], [p.preferred for p in decided]), scores_preferred, rtol=1e-5
    )


def test_dpo_reads_multi_codebook_rows_and_trains_a_musicgen_policy(parent_dir, tmp_path):
    import pyarrow as pa

    from finetune_worker.configs import dpo_config
    from finetune_worker.trainers.dpo import OnlineDPOTrainer

    policy = load_policy(parent_dir)
    rows = _buffer_rows(policy, 16)
    pairs = pairs_from_buffer(pa.Table.from_pylist(rows))
    assert pairs and pairs[0].chosen.shape == (4, FRAMES) and pairs[0].chosen_logprobs.shape == (4, FRAMES)
    settings = FinetuneSettings(
        finetune_trainer="dpo",
        finetune_steps=3,
        finetune_batch_size=4,
        finetune_optimizer="adamw",
        finetune_policy_lr=1e-2,
        finetune_dpo_beta=0.5,
        finetune_checkpoint_every=0,
    )
    trainer = OnlineDPOTrainer(dpo_config(settings), policy, load_policy(parent_dir), pairs, None)
    history = trainer.train().history
    # the stored log-probs are the sampling policy's own: the first step's margin is exactly the policy's
    # (0 up to float)
    assert history[0]["rewards/margin"] == pytest.approx(0.0, abs=1e-3)
    assert history[-1]["rewards/margin"] > 0 and history[-1]["kl"] > 0


def test_the_deploy_check_loads_and_smoke_samples_a_musicgen_version(parent_dir, tmp_path):
    # Before Triton sees a version the deployer verifies it: hashes, load, a short sample (either kind).
    from finetune_worker.deploy import CheckpointRejected, verify_checkpoint

    registry = Registry(InMemoryStore(), bucket="models")
    version = registry.publish(GENERATOR, parent_dir)
    target = registry.download(GENERATOR, version, tmp_path / "v1")
    report = verify_checkpoint(target, text_dim=384)
    assert report["kind"] == "musicgen" and report["manifest_version"] == version
    weights = next(p for p in target.iterdir() if p.suffix == ".safetensors")
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)  # changed after publishing: the manifest's hash differs
    with pytest.raises(CheckpointRejected, match="sha256|hash|integrity|mismatch"):
        verify_checkpoint(target, text_dim=384)
