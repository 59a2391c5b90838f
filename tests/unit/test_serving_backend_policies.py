"""The generator's Triton backend (serving/model_repository/generator/model.py) serving either policy,
chosen by the version directory, without a Triton server: ``triton_python_backend_utils`` is faked."""

from __future__ import annotations

import importlib.util
import sys
import types

import numpy as np
import pytest
import torch
from finetune_helpers import servable_generator
from pretrained_helpers import tiny_musicgen

from musicrl.models.generator import save_generator
from musicrl.models.policy import load_policy
from serving.model_repository import TEMPLATE_DIR, BatchingConfig, install_version

pytestmark = pytest.mark.unit


class Tensor:
    def __init__(self, name: str, array: np.ndarray):
        self.name, self.array = name, array

    def as_numpy(self) -> np.ndarray:
        return self.array


class InferenceResponse:
    def __init__(self, output_tensors=(), error=None):
        self.outputs = {t.name: t.array for t in output_tensors}
        self.error = error


class TritonError(Exception):
    pass


@pytest.fixture()
def backend(monkeypatch):
    """A fresh import of the backend module against the fake ``triton_python_backend_utils``."""
    fake = types.ModuleType("triton_python_backend_utils")
    fake.Tensor, fake.InferenceResponse, fake.TritonError = Tensor, InferenceResponse, TritonError
    fake.get_input_tensor_by_name = lambda request, name: request.get(name)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake)
    spec = importlib.util.spec_from_file_location("generator_backend_under_test", TEMPLATE_DIR / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    yield module
    torch.set_num_threads(threads)


def request(prompt_name: str, prompts: list, seeds: list[int], n_frames: int, temperature: float = 1.0, top_k: int = 0):
    n = len(seeds)
    column = lambda values, dtype: np.asarray(values, dtype=dtype).reshape(n, 1)  # noqa: E731
    prompt = (
        np.asarray(prompts, dtype=object).reshape(n, 1)
        if prompt_name == "PROMPT"
        else np.asarray(prompts, dtype=np.float32)
    )
    tensors = {
        prompt_name: prompt,
        "SEED": column(seeds, np.int64),
        "N_FRAMES": column([n_frames] * n, np.int32),
        "TEMPERATURE": column([temperature] * n, np.float32),
        "TOP_K": column([top_k] * n, np.int32),
    }
    return {name: Tensor(name, array) for name, array in tensors.items()}


def serve(backend, repo, version: str = "1"):
    model = backend.TritonPythonModel()
    model.initialize({"model_repository": str(repo / "generator"), "model_version": version})
    return model


def test_a_musicgen_version_is_served_from_its_prompt_text_at_32_khz(backend, tmp_path):
    checkpoint = tiny_musicgen(tmp_path / "musicgen", guidance_scale=3.0)
    install_version(tmp_path / "repo", 1, checkpoint, batching=BatchingConfig())
    config = (tmp_path / "repo" / "generator" / "config.pbtxt").read_text()
    assert '{ name: "PROMPT", data_type: TYPE_STRING, dims: [ 1 ] }' in config and "PROMPT_EMBEDDING" not in config
    assert 'name: "TOKENS", data_type: TYPE_INT64, dims: [ 4, -1 ]' in config

    model = serve(backend, tmp_path / "repo")
    pair = request("PROMPT", [b"calm piano melody"] * 2, [1, 2], n_frames=5, temperature=0.9)
    single = request("PROMPT", [b"fast drums"], [3], n_frames=8, top_k=4)
    empty = request("PROMPT", [b"  "], [4], n_frames=5)
    too_long = request("PROMPT", [b"slow guitar"], [5], n_frames=125)
    responses = model.execute([pair, single, empty, too_long])

    assert responses[2].error is not None and "PROMPT must not be empty" in str(responses[2].error)
    assert responses[3].error is not None and "N_FRAMES must be in [1, 124]" in str(responses[3].error)
    a, b = responses[0].outputs, responses[1].outputs
    assert a["TOKENS"].shape == a["LOGPROBS"].shape == (2, 4, 5) and b["TOKENS"].shape == (1, 4, 8)
    assert a["AUDIO"].shape == (2, 5 * 640) and b["AUDIO"].shape == (1, 8 * 640)
    assert a["SAMPLE_RATE"].tolist() == [[32_000], [32_000]] and a["POLICY_VERSION"][0, 0] == b"1"

    # Rows of different lengths were sampled apart: each is what the policy samples for it alone.
    policy = load_policy(checkpoint)
    for prompt, seed, frames, temperature, top_k, tokens in [
        ("calm piano melody", 2, 5, 0.9, 0, a["TOKENS"][1]),
        ("fast drums", 3, 8, 1.0, 4, b["TOKENS"][0]),
    ]:
        alone, _ = policy.sample(policy.condition([prompt]), frames, temperature, top_k, [seed])
        np.testing.assert_array_equal(tokens, alone[0].numpy())


def test_the_default_generator_is_served_as_before(backend, tmp_path):
    generator = servable_generator()
    install_version(tmp_path / "repo", 1, save_generator(generator, tmp_path / "default"))
    config = (tmp_path / "repo" / "generator" / "config.pbtxt").read_text()
    assert '{ name: "PROMPT_EMBEDDING", data_type: TYPE_FP32, dims: [ 384 ] }' in config
    assert 'name: "TOKENS", data_type: TYPE_INT64, dims: [ -1 ]' in config

    model = serve(backend, tmp_path / "repo")
    embeddings = np.random.default_rng(0).standard_normal((2, 384)).astype(np.float32)
    short, long = model.execute(
        [
            request("PROMPT_EMBEDDING", embeddings[:1], [7], n_frames=6),
            request("PROMPT_EMBEDDING", embeddings[1:], [8], n_frames=10),
        ]
    )
    assert short.outputs["TOKENS"].shape == (1, 6) and long.outputs["TOKENS"].shape == (1, 10)  # [T] per row, as before
    assert short.outputs["SAMPLE_RATE"].tolist() == [[16_000]] and short.outputs["AUDIO"].shape == (1, 6 * 2000)
    alone, logprobs = generator.eval().sample(torch.from_numpy(embeddings[:1]), 6, 1.0, 0, [7])
    np.testing.assert_array_equal(short.outputs["TOKENS"], alone.numpy())
    np.testing.assert_allclose(short.outputs["LOGPROBS"], logprobs.numpy(), atol=1e-5)


def test_switching_a_model_to_another_kind_of_policy_needs_a_new_config(tmp_path):
    install_version(tmp_path / "repo", 1, save_generator(servable_generator(), tmp_path / "default"))
    musicgen = tiny_musicgen(tmp_path / "musicgen")
    with pytest.raises(ValueError, match="declares another kind of policy"):
        install_version(tmp_path / "repo", 2, musicgen)  # a deployer adding a version keeps the config
    assert not (tmp_path / "repo" / "generator" / "2").exists()
    install_version(tmp_path / "repo", 2, musicgen, batching=BatchingConfig())
    assert 'name: "PROMPT"' in (tmp_path / "repo" / "generator" / "config.pbtxt").read_text()
    install_version(tmp_path / "repo", 3, musicgen)  # the next MusicGen version fits the config
