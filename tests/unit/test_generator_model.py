"""Generator: shapes, KV-cache sampling vs teacher forcing, per-row seeds, top-k, checkpoints."""

import pytest
import torch
import torch.nn.functional as F

from musicrl.audio import codec
from musicrl.models.generator import Generator, GeneratorConfig, filter_logits, load_generator, save_generator

pytestmark = pytest.mark.unit

TEXT_DIM = 384


@pytest.fixture(scope="module")
def model() -> Generator:
    torch.manual_seed(0)
    # Larger-than-default init so the random model's distributions are far from uniform and top-k bites.
    net = Generator(GeneratorConfig(n_layers=2, n_heads=2, d_model=32, max_frames=64))
    with torch.no_grad():
        net.tok_emb.weight.mul_(20)
    return net.eval()


def conds(n: int, seed: int = 0) -> torch.Tensor:
    x = torch.randn(n, TEXT_DIM, generator=torch.Generator().manual_seed(seed))
    return x / x.norm(dim=-1, keepdim=True)


def test_forward_and_hidden_shapes(model):
    tokens = torch.randint(0, codec.VOCAB_SIZE, (3, 17))
    assert model(conds(3), tokens).shape == (3, 17, codec.VOCAB_SIZE)
    assert model.hidden(conds(3), tokens).shape == (3, 17, 32)


def test_forward_is_causal(model):
    tokens = torch.randint(0, codec.VOCAB_SIZE, (2, 12))
    changed = tokens.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % codec.VOCAB_SIZE
    a, b = model(conds(2), tokens), model(conds(2), changed)
    # logits[:, t] only sees tokens[:, :t], so positions 0..7 are unchanged.
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_condition_changes_the_distribution(model):
    tokens = torch.randint(0, codec.VOCAB_SIZE, (1, 5))
    assert not torch.allclose(model(conds(1, seed=1), tokens), model(conds(1, seed=2), tokens))


def test_sample_shapes_and_range(model):
    tokens, logprobs = model.sample(conds(4), n_frames=20, temperature=0.99, top_k=0, seeds=[1, 2, 3, 4])
    assert tokens.shape == logprobs.shape == (4, 20)
    assert tokens.dtype == torch.long and logprobs.dtype == torch.float32
    assert int(tokens.min()) >= 0 and int(tokens.max()) < codec.VOCAB_SIZE
    assert bool((logprobs <= 0).all())


def test_kv_cache_logprobs_match_teacher_forcing(model):
    cond = conds(3)
    tokens, logprobs = model.sample(cond, n_frames=30, temperature=1.0, top_k=0, seeds=[5, 6, 7])
    with torch.no_grad():
        full = F.log_softmax(model(cond, tokens), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(logprobs, full, atol=1e-4, rtol=1e-4)


def test_logprobs_are_under_the_tempered_filtered_distribution(model):
    cond = conds(2)
    temperature, top_k = 0.7, 5
    tokens, logprobs = model.sample(cond, n_frames=10, temperature=temperature, top_k=top_k, seeds=[1, 2])
    with torch.no_grad():
        logits = model(cond, tokens)
    for t in range(10):
        filtered = filter_logits(logits[:, t], torch.full((2,), temperature), torch.full((2,), top_k))
        expected = F.log_softmax(filtered, dim=-1).gather(-1, tokens[:, t : t + 1]).squeeze(-1)
        torch.testing.assert_close(logprobs[:, t], expected, atol=1e-4, rtol=1e-4)
    # the differentiable helper the RL trainer uses agrees with what sampling reported
    recomputed = model.logprobs(cond, tokens, temperature=temperature, top_k=top_k)
    torch.testing.assert_close(logprobs, recomputed.detach(), atol=1e-4, rtol=1e-4)


def test_logprobs_carry_gradients(model):
    tokens = torch.randint(0, codec.VOCAB_SIZE, (2, 6))
    model.logprobs(conds(2), tokens, temperature=0.99).sum().backward()
    assert model.cond_proj.weight.grad is not None and model.cond_proj.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_row_depends_only_on_its_own_seed_not_on_the_batch(model):
    cond = conds(5)
    alone, alone_lp = model.sample(cond[2:3], n_frames=25, temperature=0.99, top_k=0, seeds=[42])
    batch, batch_lp = model.sample(cond, n_frames=25, temperature=0.99, top_k=0, seeds=[1, 2, 42, 3, 4])
    reordered, _ = model.sample(cond[[4, 2, 0]], n_frames=25, temperature=0.99, top_k=0, seeds=[4, 42, 1])
    assert torch.equal(alone[0], batch[2])
    assert torch.equal(alone[0], reordered[1])
    assert torch.equal(batch[0], reordered[2])
    torch.testing.assert_close(alone_lp[0], batch_lp[2], atol=1e-5, rtol=1e-5)


def test_same_seed_same_output_and_different_seeds_differ(model):
    cond = conds(1).repeat(3, 1)
    tokens, _ = model.sample(cond, n_frames=25, temperature=1.0, top_k=0, seeds=[9, 9, 10])
    assert torch.equal(tokens[0], tokens[1])
    assert not torch.equal(tokens[0], tokens[2])


def test_shorter_clip_is_prefix_of_longer_clip(model):
    short, short_lp = model.sample(conds(2), n_frames=8, temperature=0.99, top_k=0, seeds=[3, 4])
    long, long_lp = model.sample(conds(2), n_frames=20, temperature=0.99, top_k=0, seeds=[3, 4])
    assert torch.equal(short, long[:, :8])
    torch.testing.assert_close(short_lp, long_lp[:, :8])


def test_top_k_respected(model):
    cond = conds(3)
    top_k = 3
    tokens, _ = model.sample(cond, n_frames=30, temperature=1.5, top_k=top_k, seeds=[1, 2, 3])
    with torch.no_grad():
        logits = model(cond, tokens)
    allowed = torch.topk(logits, top_k, dim=-1).indices
    assert bool((allowed == tokens.unsqueeze(-1)).any(-1).all())
    # without top-k, a hot temperature does leave the top 3 somewhere in 90 draws
    free, _ = model.sample(cond, n_frames=30, temperature=1.5, top_k=0, seeds=[1, 2, 3])
    with torch.no_grad():
        allowed_free = torch.topk(model(cond, free), top_k, dim=-1).indices
    assert not bool((allowed_free == free.unsqueeze(-1)).any(-1).all())


def test_per_row_temperature_and_top_k(model):
    cond = conds(2)
    mixed, mixed_lp = model.sample(cond, n_frames=12, temperature=[0.5, 1.2], top_k=[2, 0], seeds=[1, 2])
    first, first_lp = model.sample(cond[:1], n_frames=12, temperature=0.5, top_k=2, seeds=[1])
    second, _ = model.sample(cond[1:], n_frames=12, temperature=1.2, top_k=0, seeds=[2])
    assert torch.equal(mixed[0], first[0]) and torch.equal(mixed[1], second[0])
    torch.testing.assert_close(mixed_lp[0], first_lp[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_frames": 0}, "n_frames"),
        ({"n_frames": 65}, "n_frames"),
        ({"temperature": 0.0}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"seeds": [1]}, "seeds"),
    ],
)
def test_sample_rejects_bad_arguments(model, kwargs, message):
    args = {"n_frames": 4, "temperature": 1.0, "top_k": 0, "seeds": [1, 2]} | kwargs
    with pytest.raises(ValueError, match=message):
        model.sample(conds(2), **args)


def test_forward_rejects_wrong_condition_width(model):
    with pytest.raises(ValueError, match="cond"):
        model(torch.zeros(1, 10), torch.zeros(1, 3, dtype=torch.long))


def test_save_load_round_trip(model, tmp_path):
    save_generator(model, tmp_path / "ckpt", {"version": "7", "trained_steps": 3})
    loaded, meta = load_generator(tmp_path / "ckpt")
    assert meta == {"version": "7", "trained_steps": 3}
    assert loaded.config == model.config
    assert not loaded.training
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    a, a_lp = model.sample(conds(2), n_frames=10, seeds=[1, 2])
    b, b_lp = loaded.sample(conds(2), n_frames=10, seeds=[1, 2])
    assert torch.equal(a, b) and torch.equal(a_lp, b_lp)


def test_load_rejects_a_directory_that_is_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a generator checkpoint"):
        load_generator(tmp_path)


HEAD = {"attribute_names": ("key", "tempo"), "attribute_sizes": (24, 3)}


def test_an_added_attribute_head_starts_as_a_no_op_and_then_conditions(model):
    with_head = Generator(GeneratorConfig(n_layers=2, n_heads=2, d_model=32, max_frames=64, **HEAD)).eval()
    missing, unexpected = with_head.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and sorted(missing) == [
        "attribute_bias.bias",
        "attribute_bias.weight",
        "attribute_logits.bias",
        "attribute_logits.weight",
        "attribute_proj.bias",
        "attribute_proj.weight",
    ]
    tokens = torch.randint(0, codec.VOCAB_SIZE, (3, 10))
    assert torch.allclose(with_head(conds(3), tokens), model(conds(3), tokens), atol=1e-5)
    assert [g.shape for g in with_head.attribute_logits_of(conds(3))] == [(3, 24), (3, 3)]
    for layer in (with_head.attribute_proj, with_head.attribute_bias):  # each path alone conditions the logits
        with torch.no_grad():
            layer.weight.normal_()
        assert not torch.allclose(with_head(conds(3), tokens), model(conds(3), tokens), atol=1e-3)
        with torch.no_grad():
            layer.weight.zero_()
    with torch.no_grad():
        with_head.attribute_proj.weight.normal_(), with_head.attribute_bias.weight.normal_()
    # sampling goes through the same condition as teacher forcing
    sampled, logprobs = with_head.sample(conds(2), 12, temperature=1.0, seeds=[1, 2])
    assert torch.allclose(logprobs, with_head.logprobs(conds(2), sampled), atol=1e-4)


def test_attribute_head_survives_a_checkpoint_round_trip(tmp_path):
    torch.manual_seed(1)
    net = Generator(GeneratorConfig(n_layers=1, n_heads=2, d_model=16, max_frames=16, **HEAD)).eval()
    loaded, _ = load_generator(save_generator(net, tmp_path / "head"))
    assert loaded.config == net.config and loaded.config.attribute_sizes == (24, 3)  # JSON lists back to tuples
    assert all(torch.allclose(a, b) for a, b in zip(loaded.condition(conds(2)), net.condition(conds(2)), strict=True))


def test_attribute_head_config_is_validated():
    with pytest.raises(ValueError, match="pair up"):
        GeneratorConfig(attribute_names=("mode",), attribute_sizes=(2, 3))
    with pytest.raises(ValueError, match="pair up"):
        GeneratorConfig(attribute_names=("mode",), attribute_sizes=(1,))


def test_beat_clock_follows_the_bpm_and_sampling_matches_teacher_forcing():
    bins = (60.0, 90.0, 120.0)
    torch.manual_seed(2)
    net = Generator(
        GeneratorConfig(
            n_layers=1,
            n_heads=2,
            d_model=16,
            max_frames=32,
            attribute_names=("bpm",),
            attribute_sizes=(3,),
            bpm_bins=bins,
        )
    ).eval()
    with torch.no_grad():
        net.clock_proj.weight.normal_()
    tokens = torch.randint(0, codec.VOCAB_SIZE, (2, 20))
    slow, fast = net(conds(2), tokens, torch.tensor([60.0, 60.0])), net(conds(2), tokens, torch.tensor([150.0, 150.0]))
    assert torch.allclose(slow[:, 0], fast[:, 0], atol=1e-5)  # every clock starts at phase 0
    assert not torch.allclose(slow[:, 1:], fast[:, 1:], atol=1e-3)
    expected = net.expected_bpm(conds(2)).detach()
    assert float(expected.min()) >= 60.0 and float(expected.max()) <= 120.0
    # without a bpm the clock runs at the BPM the head reads off the caption, in sampling and in teacher forcing alike
    assert torch.allclose(net(conds(2), tokens), net(conds(2), tokens, net.expected_bpm(conds(2))), atol=1e-6)
    sampled, logprobs = net.sample(conds(2), 20, temperature=1.0, seeds=[3, 4])
    assert torch.allclose(logprobs, net.logprobs(conds(2), sampled), atol=1e-4)
    with pytest.raises(ValueError, match="beat clock needs a 'bpm' attribute"):
        GeneratorConfig(attribute_names=("tempo",), attribute_sizes=(3,), bpm_bins=bins)
