import numpy as np
import pytest

from musicrl.text import HashingTextEncoder, TextEncoder, load_text_encoder

pytestmark = pytest.mark.unit


def test_hashing_encoder_is_deterministic_normalised_and_discriminative():
    encoder = load_text_encoder("hashing")
    assert isinstance(encoder, TextEncoder)
    texts = ["a slow sad piano melody", "a slow sad piano melody", "fast loud brass fanfare", ""]
    vectors = encoder.embed(texts)
    assert vectors.shape == (4, 384) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert np.allclose(vectors[0], vectors[1])
    assert vectors[0] @ vectors[2] < 0.5
    assert HashingTextEncoder(dim=32).embed(["x"]).shape == (1, 32)


def test_unknown_encoder_and_bad_input_are_rejected():
    with pytest.raises(ValueError, match="unknown text encoder"):
        load_text_encoder("bert")
    with pytest.raises(TypeError):
        load_text_encoder("hashing").embed("not a list")


def test_minilm_encoder_loads_offline_and_ranks_paraphrases_closer():
    encoder = load_text_encoder("minilm")
    vectors = encoder.embed(
        ["a slow, sad piano melody", "a sorrowful unhurried piano tune", "a fast electronic synth track"]
    )
    assert vectors.shape == (3, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]
    assert encoder.embed([]).shape == (0, 384)
