"""Rewards for a MusicGen policy: its rollouts' codes are decoded by the policy and sent as audio (the reward service
would decode tokens with the default codec); the default generator's path is untouched."""

from __future__ import annotations

import base64
import json

import httpx
import numpy as np
import pytest
import torch
from finetune_helpers import TokenFractionReward, tiny_generator
from pretrained_helpers import tiny_musicgen

from finetune_worker.reward_client import HttpRewardFunction
from finetune_worker.rewards import PolicyRewardFunction, for_policy, make_reward_fn
from musicrl.audio.formats import decode_audio
from musicrl.models.policy import as_policy, load_policy

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def musicgen(tmp_path_factory):
    return load_policy(tiny_musicgen(tmp_path_factory.mktemp("musicgen") / "m", guidance_scale=3.0))


def test_the_default_generator_keeps_its_reward_function():
    reward = TokenFractionReward()
    assert for_policy(reward, as_policy(tiny_generator())) is reward


def test_musicgen_rollouts_reach_the_reward_service_as_their_decoded_audio(musicgen):
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append(body)
        scores = [{"text_adherence": 0.25, "quality_mos": 3.0, "quality": 0.5, "combined": 0.75} for _ in body["items"]]
        return httpx.Response(
            200,
            json={
                "scores": scores,
                "components": body["components"],
                "weights": {},
                "model_versions": {"text_adherence": "3", "quality": "4", "preference": "9"},
            },
        )

    client = HttpRewardFunction("http://reward", max_items=2, transport=httpx.MockTransport(handler))
    reward = for_policy(client, musicgen)
    assert isinstance(reward, PolicyRewardFunction)
    codes = torch.randint(0, musicgen.vocab_size, (3, 4, 15))
    out = reward(["calm piano", "fast drums", "sad strings"], codes.numpy())

    assert [len(b["items"]) for b in seen] == [2, 1]
    # audio only, no tokens; and not the service's preference (a model of the default codec's tokens)
    assert all(set(item) == {"prompt", "audio_b64"} for b in seen for item in b["items"])
    assert all(b["components"] == ["text_adherence", "quality"] for b in seen)
    wave, rate = decode_audio(base64.b64decode(seen[0]["items"][1]["audio_b64"]))
    expected = musicgen.decode(codes[1:2])[0]
    assert rate == 32_000 and wave.shape == expected.shape == (int(15 / 50 * 32_000),)
    np.testing.assert_allclose(wave, expected, atol=2 / 2**15)  # 16-bit WAV
    assert out["text_adherence"].tolist() == [0.25] * 3 and "preference" not in out
    assert reward.versions == {"text_adherence": "3", "quality": "4"}


def test_the_in_process_suite_scores_the_decoded_audio_at_the_policy_rate(musicgen):
    from musicrl.rewards.suite import Clip

    suite_fn = make_reward_fn("local:tiny")
    reward = for_policy(suite_fn, musicgen)
    codes = torch.randint(0, musicgen.vocab_size, (2, 4, 20)).numpy()  # 0.4 s: above the suite's 0.25 s minimum
    out = reward(["calm piano", "fast drums"], codes)
    waves = musicgen.decode(codes)
    direct = suite_fn.suite.score(
        [Clip(prompt=p, wave=w, sample_rate=32_000) for p, w in zip(["calm piano", "fast drums"], waves)],
        ("text_adherence", "quality"),
    )
    assert out["text_adherence"].tolist() == pytest.approx([row["text_adherence"] for row in direct])
    assert out["quality"].tolist() == pytest.approx([row["quality"] for row in direct]) and "preference" not in out


def test_the_rl_step_benchmark_merges_its_numbers_into_the_results_file(tmp_path):
    from benchmarks.rl_step_musicgen import RLBenchConfig, run_rl_step_bench

    output = tmp_path / "musicgen.json"
    output.write_text(json.dumps({"benchmark": "serving_musicgen", "levels": [1, 2]}))
    results = run_rl_step_bench(RLBenchConfig(batch_size=4, group_size=2, duration_s=0.1, steps=1, output=output))
    merged = json.loads(output.read_text())
    assert merged["benchmark"] == "serving_musicgen" and merged["levels"] == [1, 2]  # the serving numbers stay
    assert merged["rl_step"] == results and results["tokens_per_step"] == 4 * 4 * 5 and results["frames_per_clip"] == 5
    assert results["tokens_per_s"] > 0 and len(results["step_s_all"]) == 2
