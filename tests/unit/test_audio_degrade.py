import numpy as np
import pytest

from musicrl.audio import codec
from musicrl.audio.degrade import DEGRADATIONS, mos_of, render_degraded
from musicrl.audio.features import log_mel
from musicrl.corpus import make_corpus

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tokens():
    return make_corpus(1, seed=4)[0].tokens


@pytest.mark.parametrize("name", DEGRADATIONS)
def test_damage_grows_with_strength(name, tokens):
    clean = codec.decode(tokens)
    clean_power = np.exp(log_mel(clean))
    errors = []
    for strength in (0.0, 0.5, 1.0):
        wave = render_degraded(tokens, {name: strength}, np.random.default_rng(0))
        assert wave.shape == clean.shape and wave.dtype == np.float32 and np.abs(wave).max() <= 1.0
        errors.append(float(np.mean(np.abs(np.exp(log_mel(wave)) - clean_power))))  # spectral damage
    assert errors[0] < 0.1 * errors[2]
    assert errors[0] < errors[1] < errors[2]


def test_degradations_are_seeded(tokens):
    spec = {"noise": 0.4, "dropouts": 0.6, "glitches": 0.5}
    a = render_degraded(tokens, spec, np.random.default_rng(1))
    b = render_degraded(tokens, spec, np.random.default_rng(1))
    assert np.array_equal(a, b)


def test_mos_label_and_unknown_degradation():
    assert mos_of({}) == 5.0
    assert mos_of({"noise": 1.0}) == 1.0
    assert mos_of({"noise": 0.5, "clipping": 0.5}) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="unknown degradations"):
        render_degraded(np.array([codec.REST]), {"reverb": 0.5}, np.random.default_rng(0))
