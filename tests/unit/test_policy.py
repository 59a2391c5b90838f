"""The policy interface: both implementations behind it, chosen by the version directory.

MusicGen runs as a tiny random MusicgenForConditionalGeneration saved with save_pretrained
(tests/pretrained_helpers.py); the default generator as a tiny random Generator.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from finetune_helpers import servable_generator
from pretrained_helpers import (
    one_thread_per_module,  # noqa: F401 - autouse fixture
    tiny_musicgen,
)

from musicrl.audio import codec
from musicrl.models.generator import save_generator
from musicrl.models.musicgen import MusicgenPolicy, delay
from musicrl.models.policy import GeneratorPolicy, load_policy, policy_kind
from musicrl.text import HashingTextEncoder

pytestmark = pytest.mark.unit
PROMPTS = ["calm piano melody", "fast drums with loud guitar"]


@pytest.fixture(scope="module")
def musicgen_dir(tmp_path_factory):
    return tiny_musicgen(tmp_path_factory.mktemp("musicgen"), guidance_scale=3.0)


@pytest.fixture(scope="module")
def musicgen(musicgen_dir):
    return load_policy(musicgen_dir)


def test_the_directory_says_which_policy_it_holds(musicgen_dir, musicgen, tmp_path):
    assert policy_kind(musicgen_dir) == "musicgen" and isinstance(musicgen, MusicgenPolicy)
    assert musicgen.guidance_scale == 3.0  # a plain snapshot samples as its generation config says
    assert (musicgen.sample_rate, musicgen.frame_rate, musicgen.num_codebooks, musicgen.vocab_size) == (
        32_000,
        50.0,
        4,
        16,
    )
    default_dir = save_generator(servable_generator(), tmp_path / "default")
    default = load_policy(default_dir, embed=HashingTextEncoder().embed)
    assert policy_kind(default_dir) == "default" and isinstance(default, GeneratorPolicy)
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "policy.json").write_text(json.dumps({"kind": "jukebox"}))
    with pytest.raises(ValueError, match="unknown policy kind 'jukebox'"):
        policy_kind(tmp_path / "odd")


def test_the_default_generator_behind_the_interface_is_unchanged():
    generator = servable_generator()
    policy = GeneratorPolicy(generator, HashingTextEncoder().embed).eval()
    cond = policy.condition(PROMPTS)
    tokens, logprobs = policy.sample(cond, 12, temperature=0.9, top_k=[0, 20], seeds=[3, 4])
    direct_tokens, direct_logprobs = generator.sample(cond, 12, 0.9, [0, 20], [3, 4])
    assert tokens.shape == (2, 1, 12) and torch.equal(tokens[:, 0], direct_tokens)
    torch.testing.assert_close(logprobs[:, 0], direct_logprobs)
    torch.testing.assert_close(policy.logprobs(cond, tokens, 0.9, torch.tensor([0, 20])), logprobs, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(policy.decode(tokens)[1], codec.decode(direct_tokens[1].numpy()))
    assert [policy.frames_for(s) for s in (0.5, 10.0, 2.31)] == [codec.frames_for(s) for s in (0.5, 10.0, 2.31)]


def test_the_delay_layout_is_musicgens_own(musicgen):
    tokens = torch.randint(0, musicgen.vocab_size, (2, 4, 7))
    delayed = delay(tokens, musicgen.pad)
    bos = torch.full((2 * 4, 1), musicgen.pad)
    _, pattern = musicgen.model.decoder.build_delay_pattern_mask(bos, pad_token_id=musicgen.pad, max_length=7 + 4)
    predicted = pattern.view(2, 4, 11) == -1  # where transformers' generate writes sampled codes
    assert torch.equal(predicted, delayed != musicgen.pad)
    assert torch.equal(delayed[predicted].view(2, 4, 7), tokens)


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_sampled_log_probs_are_the_teacher_forced_log_probs_of_the_same_tokens(musicgen_dir, guidance_scale):
    policy = MusicgenPolicy.load(musicgen_dir)
    policy.guidance_scale = guidance_scale
    policy.eval()
    cond = policy.condition(PROMPTS)
    temperatures, top_ks = [1.0, 0.7], [0, 5]
    tokens, sampled = policy.sample(cond, 9, temperature=temperatures, top_k=top_ks, seeds=[11, 12])
    assert tokens.shape == sampled.shape == (2, 4, 9) and int(tokens.max()) < policy.vocab_size
    forced = policy.logprobs(cond, tokens, temperatures, top_ks)
    torch.testing.assert_close(forced, sampled, atol=1e-5, rtol=0)
    # differentiable, through the decoder only: T5 and EnCodec are frozen
    forced.sum().backward()
    assert policy.model.decoder.lm_heads[0].weight.grad is not None
    assert all(p.grad is None for p in policy.model.text_encoder.parameters())


def test_each_row_depends_only_on_its_own_seed(musicgen):
    alone_tokens, alone_logprobs = musicgen.sample(musicgen.condition(PROMPTS[:1]), 8, 0.9, 0, [7])
    batch_tokens, batch_logprobs = musicgen.sample(musicgen.condition([PROMPTS[1], PROMPTS[0]]), 8, 0.9, 0, [99, 7])
    assert torch.equal(batch_tokens[1], alone_tokens[0])
    torch.testing.assert_close(batch_logprobs[1], alone_logprobs[0], atol=1e-5, rtol=0)
    other_seed, _ = musicgen.sample(musicgen.condition(PROMPTS[:1]), 8, 0.9, 0, [8])
    assert not torch.equal(other_seed, alone_tokens)


def test_greedy_sampling_reproduces_transformers_generate(musicgen_dir, monkeypatch):
    """Conditioning, guidance and delay pattern are MusicGen's own: top-1 sampling is generate's greedy search.
    The tiny decoder barely listens to its text, so a large guidance scale makes guidance change the tokens."""
    policy = MusicgenPolicy.load(musicgen_dir).eval()
    codes = []
    decode = policy.model.audio_encoder.decode
    monkeypatch.setattr(
        policy.model.audio_encoder, "decode", lambda c, *a, **k: codes.append(c[0].clone()) or decode(c, *a, **k)
    )
    inputs = policy.tokenizer(PROMPTS, padding=True, return_tensors="pt")
    greedy = {}
    for scale in (1.0, 30.0):
        policy.guidance_scale = scale
        greedy[scale], _ = policy.sample(policy.condition(PROMPTS), 6, temperature=1.0, top_k=1, seeds=[0, 1])
        with torch.no_grad():
            audio = policy.model.generate(**inputs, do_sample=False, guidance_scale=scale, max_new_tokens=6 + 4 - 1)
        assert torch.equal(codes[-1], greedy[scale])  # the codes generate decoded
        np.testing.assert_allclose(policy.decode(greedy[scale]), audio[:, 0].clamp(-1, 1).numpy(), atol=1e-6)
    assert not torch.equal(greedy[1.0], greedy[30.0])


def test_save_and_load_keep_the_policy(musicgen, tmp_path):
    musicgen.save(tmp_path / "v2", {"step": 3})
    assert json.loads((tmp_path / "v2" / "policy.json").read_text()) == {"kind": "musicgen", "guidance_scale": 3.0}
    again = load_policy(tmp_path / "v2")
    tokens = torch.randint(0, 16, (2, 4, 5))
    torch.testing.assert_close(again(again.condition(PROMPTS), tokens), musicgen(musicgen.condition(PROMPTS), tokens))
    audio = again.decode(tokens)
    assert audio.shape == (2, 5 * 640) and audio.dtype == np.float32  # 32 kHz / 50 frames per second
    assert again.frames_for(10.0) == 500


def test_bad_requests_are_refused(musicgen):
    cond = musicgen.condition(PROMPTS)
    with pytest.raises(ValueError, match="n_frames must be in 1..124"):
        musicgen.sample(cond, 125)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        musicgen.sample(cond, 4, temperature=0.0)
    with pytest.raises(ValueError, match="tokens must be"):
        musicgen(cond, torch.zeros(2, 3, 4, dtype=torch.long))
