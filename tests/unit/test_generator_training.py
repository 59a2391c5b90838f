"""Generator pretraining: seeded, resumable, writes a loadable checkpoint."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from musicrl.models.generator import GeneratorConfig, load_generator
from musicrl.models.train_generator import GeneratorTrainingConfig, learning_rate_at, train_generator

pytestmark = pytest.mark.unit


def tiny_config(tmp_path: Path, name: str, steps: int = 4) -> GeneratorTrainingConfig:
    model = GeneratorConfig(n_layers=1, n_heads=2, d_model=16, max_frames=24, text_encoder="hashing")
    return GeneratorTrainingConfig(
        out_dir=tmp_path / name / "out",
        work_dir=tmp_path / name / "work",
        model=model,
        n_train=24,
        n_valid=6,
        steps=steps,
        batch_size=4,
        warmup_steps=2,
        checkpoint_every=2,
        eval_every=2,
        progress=False,
    )


def test_training_writes_a_loadable_checkpoint_and_lowers_the_loss(tmp_path):
    config = replace(tiny_config(tmp_path, "run", steps=30), learning_rate=1e-2)
    metrics = train_generator(config)
    model, meta = load_generator(config.out_dir)
    assert meta["metrics"]["steps"] == 30 and meta["kind"] == "generator"
    assert model.config == config.model
    log = (config.work_dir / "train_log.jsonl").read_text().splitlines()
    assert metrics["valid_loss"] < 6.0  # log(vocab) = 6.65 for an untrained model
    assert len(log) >= 3


def test_same_seed_gives_identical_weights(tmp_path):
    first, second = tiny_config(tmp_path, "a"), tiny_config(tmp_path, "b")
    train_generator(first), train_generator(second)
    a, _ = load_generator(first.out_dir)
    b, _ = load_generator(second.out_dir)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


def test_resume_continues_from_the_saved_step(tmp_path):
    config = tiny_config(tmp_path, "resume", steps=4)
    train_generator(config)
    longer = replace(config, steps=6)
    train_generator(longer)
    state = torch.load(config.work_dir / "train_state.pt", weights_only=False)
    assert state["step"] == 6
    steps_logged = [
        line for line in (config.work_dir / "train_log.jsonl").read_text().splitlines() if '"valid_loss"' in line
    ]
    assert [int(line.split('"step": ')[1].split(",")[0]) for line in steps_logged] == [2, 4, 6]


def test_resume_refuses_state_from_other_settings(tmp_path):
    config = tiny_config(tmp_path, "mismatch", steps=2)
    train_generator(config)
    with pytest.raises(ValueError, match="other settings"):
        train_generator(replace(config, learning_rate=0.5))


def test_learning_rate_warms_up_then_decays():
    config = GeneratorTrainingConfig(steps=100, warmup_steps=10, learning_rate=1e-3, min_learning_rate=1e-4)
    rates = [learning_rate_at(s, config) for s in range(100)]
    assert rates[0] < rates[9] == pytest.approx(1e-3)
    assert rates[99] == pytest.approx(1e-4, rel=0.05)
    assert all(a >= b for a, b in zip(rates[10:], rates[11:], strict=False))


def test_second_stage_starts_from_a_checkpoint_and_trains_on_openings(tmp_path):
    first = tiny_config(tmp_path, "stage1", steps=2)
    train_generator(first)
    start, _ = load_generator(first.out_dir)
    second = replace(
        tiny_config(tmp_path, "stage2", steps=2),
        init_from=first.out_dir,
        batch_size=1,
        start_batch_size=4,
        start_frames=6,
    )
    metrics = train_generator(second)
    trained, meta = load_generator(second.out_dir)
    assert meta["training"]["init_from"] == str(first.out_dir) and metrics["steps"] == 2
    # the lineage: version 1 from scratch, then version 2 with both stages recorded
    assert load_generator(first.out_dir)[1]["version"] == "1" and meta["version"] == "2"
    assert [s["stage"] for s in meta["stages"]] == [1, 2] and meta["stages"][1]["parent_version"] == "1"
    assert meta["stages"][1]["training"]["start_batch_size"] == 4
    # started from stage 1 (not from scratch) and moved away from it
    assert not torch.equal(trained.cond_proj.weight, start.cond_proj.weight)
    assert (trained.cond_proj.weight - start.cond_proj.weight).abs().max() < 0.1


def test_init_from_a_checkpoint_of_another_shape_is_refused(tmp_path):
    first = tiny_config(tmp_path, "small", steps=1)
    train_generator(first)
    other = tiny_config(tmp_path, "wide", steps=1)
    other = replace(other, init_from=first.out_dir, model=replace(other.model, d_model=32))
    with pytest.raises(ValueError, match="another model config"):
        train_generator(other)


def test_counterfactual_scores_are_the_clip_log_likelihoods_under_each_caption():
    from musicrl.models.generator import Generator
    from musicrl.models.train_generator import Batch, counterfactual_scores

    torch.manual_seed(0)
    model = Generator(GeneratorConfig(n_layers=1, n_heads=2, d_model=16, max_frames=12, text_dim=8)).eval()
    cond, others, tokens = torch.randn(3, 8), torch.randn(3, 2, 8), torch.randint(0, 774, (3, 10))
    scores, logits = counterfactual_scores(model, Batch(cond, tokens, others))
    assert scores.shape == (3, 3) and logits.shape == (3, 10, 774)
    assert torch.allclose(scores[:, 0], model.logprobs(cond, tokens).sum(-1), atol=1e-4)
    assert torch.allclose(scores[:, 2], model.logprobs(others[:, 1], tokens).sum(-1), atol=1e-4)
    assert torch.allclose(logits, model(cond, tokens), atol=1e-5)


def test_counterfactual_loss_teaches_the_model_to_prefer_the_true_caption():
    from musicrl.models.generator import Generator
    from musicrl.models.train_generator import Batch, batch_loss

    torch.manual_seed(0)
    model = Generator(GeneratorConfig(n_layers=1, n_heads=2, d_model=16, max_frames=12, text_dim=8))
    cond = torch.randn(8, 8)
    batch = Batch(cond, torch.randint(0, 774, (8, 10)), cond.unsqueeze(1) + 0.3 * torch.randn(8, 2, 8))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    _, before = batch_loss(model, [batch])
    for _ in range(30):
        loss, logs = batch_loss(model, [batch], counterfactual_weight=1.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    _, after = batch_loss(model, [batch])
    assert after["counterfactual_loss"] < before["counterfactual_loss"]
    assert after["mode_margin_nats"] > before["mode_margin_nats"] and after["mode_preferred"] >= 0.75
    assert after["tempo_margin_nats"] > before["tempo_margin_nats"] and after["tempo_preferred"] >= 0.75


def test_training_with_counterfactual_captions_logs_how_often_the_true_caption_wins(tmp_path):
    config = replace(
        tiny_config(tmp_path, "counterfactual", steps=4), counterfactual_batch_size=4, counterfactual_frames=12
    )
    metrics = train_generator(config)
    for name in ("mode", "tempo"):
        assert 0.0 <= metrics[f"valid_{name}_preferred"] <= 1.0
    entries = [json.loads(line) for line in (config.work_dir / "train_log.jsonl").read_text().splitlines()]
    assert all("mode_margin_nats" in e for e in entries) and "valid_tempo_preferred" in entries[-1]
    # the counterfactual weight is part of the run's identity: another weight cannot resume it
    with pytest.raises(ValueError, match="other settings"):
        train_generator(replace(config, counterfactual_weight=0.5))


def test_a_run_adds_an_attribute_head_to_a_checkpoint_fitted_on_the_captions(tmp_path):
    first = tiny_config(tmp_path, "no-head", steps=2)
    train_generator(first)
    base = tiny_config(tmp_path, "head", steps=2)
    head = replace(base.model, attribute_names=("key", "mode"), attribute_sizes=(24, 2))
    config = replace(base, model=head, init_from=first.out_dir, counterfactual_batch_size=4, counterfactual_frames=12)
    metrics = train_generator(config)
    # the hashing encoder sees the words themselves: the fitted head reads the mode off them, and the key
    # wherever the caption names the tonic (two phrasings in three)
    assert metrics["mode_head_fit_accuracy"] > 0.95 and metrics["key_head_fit_accuracy"] > 0.6
    assert metrics["valid_mode_head_accuracy"] > 0.8
    trained, _ = load_generator(config.out_dir)
    start, _ = load_generator(first.out_dir)
    assert trained.config.attribute_names == ("key", "mode")
    assert (trained.cond_proj.weight - start.cond_proj.weight).abs().max() < 0.1  # the trunk came from the checkpoint
    # a resumed run keeps the head-fit metrics of the run it continues
    assert train_generator(replace(config, steps=4))["mode_head_fit_accuracy"] == metrics["mode_head_fit_accuracy"]


def test_token_log_likelihood_ratios_favour_what_each_attribute_value_plays():
    from musicrl.models.train_generator import CaptionedClips, token_log_likelihood_ratios

    # value 0 clips play token 10, value 1 clips token 20; token 30 is everywhere
    tokens = torch.tensor([[10, 30, 10, 30], [10, 30, 30, 30], [20, 30, 20, 30], [20, 20, 30, 30]])
    data = CaptionedClips(tokens, torch.zeros(4, 1, 8), labels=torch.tensor([[0], [0], [1], [1]]))
    llr = token_log_likelihood_ratios(data, (2,), vocab_size=40, prior_frames=1.0)
    assert llr.shape == (2, 40)
    assert llr[0, 10] > llr[0, 30] > llr[0, 20] and llr[1, 20] > llr[1, 30] > llr[1, 10]
    assert llr[0, 10] > 0.5 and llr[0, 20] < -1.5  # played twice as often as overall / never played under value 0
    # a token no clip plays is not favoured by any value
    assert (llr[:, 0] < 0).all()
