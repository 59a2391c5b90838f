"""FinetuneCycle.update_reward_model against an in-memory registry: the probe fit (the default) and its
cross-validated check; for the paper's fine-tuning: warm start from the current preference model, bounded
replay, lineage (no servers)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from feedback_helpers import InMemoryStore
from finetune_helpers import embed, one_thread, tiny_generator  # noqa: F401 - fixture

from finetune_worker.cycle import PREFERENCE, FinetuneCycle, RunState
from finetune_worker.settings import FinetuneSettings
from musicrl.models.generator import Generator, GeneratorConfig, save_generator
from musicrl.models.preference import PreferenceRewardModel, load_preference_model, save_preference_model
from musicrl.registry import Registry

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_thread")]


def _rows(n: int, policies: int) -> list[dict]:
    """Listeners prefer the clip with more 7s; rows spread over policy versions 1..policies."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        a, b = rng.integers(0, 16, 12), rng.integers(0, 16, 12)
        choice = "a" if (a == 7).sum() > (b == 7).sum() else "b" if (b == 7).sum() > (a == 7).sum() else "tie"
        rows.append(
            {
                "generation_id": f"{i:032d}",
                "prompt": f"prompt {i % 5}",
                "choice": choice,
                "tokens_a": a.tolist(),
                "tokens_b": b.tolist(),
                "listen_a_frac": 1.0,
                "listen_b_frac": 1.0,
                "policy_version": str(1 + i * policies // n),
                "mixed_policy": False,
            }
        )
    return rows


@pytest.fixture
def cycle(tmp_path) -> FinetuneCycle:
    settings = FinetuneSettings(
        finetune_work_dir=tmp_path,
        finetune_rm_min_pairs=20,
        finetune_rm_max_pairs=120,
        finetune_rm_epochs=3,
        finetune_rm_lr=3e-3,
        finetune_rm_heads=3,
        finetune_rm_disagreement_penalty=0.5,
        finetune_heldout_fraction=0.2,
        finetune_rm_fit="finetune",
    )
    cycle = FinetuneCycle.__new__(FinetuneCycle)  # no servers: an in-memory registry, no reward service
    cycle.settings, cycle.registry, cycle.run_dir = settings, Registry(InMemoryStore()), tmp_path / "run"
    cycle.reward_fn, cycle._embed, cycle.guard = None, embed, lambda: None
    save_generator(tiny_generator(), cycle.run_dir / "parent")
    return cycle


def _state(parent: str = "3") -> RunState:
    return RunState(
        run_id="r", created_at="now", stage="U", trainer="reinforce", parent_version=parent, reference_version="1"
    )


def test_the_second_cycle_continues_from_the_published_model_on_a_bounded_replay(cycle):
    rows = _rows(900, policies=3)
    first = cycle.update_reward_model(rows, _state())
    assert first["published"] == "1" and first["warm_start_from"] is None
    assert (
        first["n_train_pairs"] == 120 and first["n_heldout_pairs"] == 30
    )  # capped (the buffer holds ~700 train pairs)
    assert first["n_train_current_policy"] + first["n_train_replay"] == 120
    manifest = cycle.registry.manifest(PREFERENCE, "1")
    assert manifest["lineage"]["warm_start_from"] is None and manifest["lineage"]["training_config"]["n_heads"] == 3
    assert manifest["metrics"]["heldout_accuracy_before"] == first["heldout_accuracy_before"]

    second = cycle.update_reward_model(rows, _state())
    assert second["warm_start_from"] == "1" and second["published"] == "2"
    # it started from version 1: on the same held-out pairs its accuracy before training is version 1's after
    assert second["heldout_accuracy_before"] == pytest.approx(first["heldout_accuracy"])
    assert cycle.registry.manifest(PREFERENCE, "2")["lineage"]["warm_start_from"] == "1"
    model, meta = load_preference_model(cycle.registry.download(PREFERENCE, "2", cycle.run_dir / "check"))
    assert (model.n_heads, model.disagreement_penalty) == (3, 0.5) and meta["initialised_from"] == {
        "kind": PREFERENCE,
        "version": "1",
    }


def test_a_current_model_of_another_architecture_is_not_warm_started(cycle, tmp_path):
    other = Generator(GeneratorConfig(vocab_size=16, text_dim=8, max_frames=32, n_layers=2, n_heads=2, d_model=32))
    path = save_preference_model(PreferenceRewardModel.from_generator(other), tmp_path / "other", export_onnx=False)
    cycle.registry.set_current(PREFERENCE, cycle.registry.publish(PREFERENCE, path, lineage={"run_id": "earlier"}))
    result = cycle.update_reward_model(_rows(300, policies=1), _state("1"))
    assert result["warm_start_from"] is None and result["published"] == "2"


def test_the_committed_bootstrap_model_is_not_warm_started(cycle, tmp_path):
    """A current model no cycle trained on votes (no run in its lineage) is a prior, not these users' taste."""
    generator = tiny_generator()
    path = save_preference_model(
        PreferenceRewardModel.from_generator(generator), tmp_path / "bootstrap", export_onnx=False
    )
    cycle.registry.set_current(PREFERENCE, cycle.registry.publish(PREFERENCE, path))
    result = cycle.update_reward_model(_rows(300, policies=1), _state("1"))
    assert result["warm_start_from"] is None and result["published"] == "2"
    assert cycle.registry.manifest(PREFERENCE, "2")["lineage"]["run_id"] == "r"
    # the model it published was trained on votes: the next cycle continues from it
    assert cycle.update_reward_model(_rows(300, policies=1), _state("1"))["warm_start_from"] == "2"


def test_warm_start_can_be_switched_off(cycle):
    rows = _rows(300, policies=1)
    assert cycle.update_reward_model(rows, _state("1"))["published"] == "1"
    cycle.settings = cycle.settings.model_copy(update={"finetune_rm_warm_start": False})
    assert cycle.update_reward_model(rows, _state("1"))["warm_start_from"] is None


def test_the_cycle_applies_the_per_user_cap_and_reports_what_it_dropped(cycle):
    assert FinetuneSettings().finetune_max_pairs_per_user == 20  # on by default
    rows = _rows(300, policies=1)
    for i, row in enumerate(rows):
        row["user_pseudonym"] = "f" * 64 if i < 200 else f"{i:064x}"  # one listener cast two thirds of the votes
    cycle.settings = cycle.settings.model_copy(
        update={"finetune_max_pairs_per_user": 10, "finetune_rm_min_pairs": 1000}
    )
    report = cycle.update_reward_model(rows, _state("1"))  # too few pairs left to train: skipped, with the counts
    assert "skipped" in report and report["max_pairs_per_user"] == 10
    assert (
        report["n_train_dropped_user_cap"] + report["n_heldout_dropped_user_cap"]
        == report["n_dropped_user_cap"]
        == 200 - 20
    )


def _probe(cycle: FinetuneCycle) -> FinetuneCycle:
    cycle.settings = cycle.settings.model_copy(update={"finetune_rm_fit": "probe", "finetune_rm_l2": 1.0})
    return cycle


def test_the_probe_fits_heads_on_every_selected_pair_and_reports_a_cross_validated_accuracy(cycle):
    result = _probe(cycle).update_reward_model(_rows(300, policies=1), _state("1"))
    assert result["published"] == "1" and result["fit"] == "probe" and result["warm_start_from"] is None
    assert result["n_train_pairs"] == 120 + 30  # the capped train rows and the capped held-out rows, together
    assert result["heldout_accuracy"] == result["cv_accuracy"] > 0.7  # the 7s rule is learnable from the frozen trunk
    lineage = cycle.registry.manifest(PREFERENCE, "1")["lineage"]
    assert lineage["training_config"]["fit"] == "probe" and lineage["training_config"]["l2"] == 1.0
    # the trunk is the parent generator's, untouched: only the heads were fitted
    model, _ = load_preference_model(cycle.registry.download(PREFERENCE, "1", cycle.run_dir / "check"))
    parent = tiny_generator()
    assert all(torch.equal(a, b) for a, b in zip(model.trunk.state_dict().values(), parent.state_dict().values()))
    # and each head is its own bootstrap fit
    assert model.n_heads == 3 and not torch.allclose(model.head.weight[0], model.head.weight[1])


def test_the_probe_is_not_used_when_it_does_not_beat_chance_out_of_sample(cycle):
    rows = _rows(300, policies=1)
    rng = np.random.default_rng(1)
    for row in rows:  # votes unrelated to the clips
        row["choice"] = "a" if rng.random() < 0.5 else "b"
    result = _probe(cycle).update_reward_model(rows, _state("1"))
    assert result["cv_accuracy"] < 0.6 and (result["published"] is None) == (result["cv_accuracy"] <= 0.5)


def test_a_fresh_fine_tuned_model_whose_best_epoch_is_the_untrained_one_is_not_published(cycle, monkeypatch):
    """Epoch 0 of a model fine-tuned from the generator has random heads: a lucky score on a few
    held-out pairs must not publish it."""
    import finetune_worker.cycle as cycle_module

    def untrained(settings, generator, train, heldout, reward_fn, out_dir, **_):
        return {"best_epoch": 0, "heldout_accuracy": 0.75, "n_train_pairs": len(train.pairs)}, {"fit": "finetune"}

    monkeypatch.setattr(cycle_module, "reward_model_from_settings", untrained)
    result = cycle.update_reward_model(_rows(300, policies=1), _state("1"))
    assert result["published"] is None and cycle.registry.current(PREFERENCE) is None
