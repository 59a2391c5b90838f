"""An attribute probe: can tempo, mode and instrument family be heard in a waveform?

One standardised logistic regression per attribute, each on the features of
the audio (never of tokens or captions) that carry it, trained on corpus renders:

- instrument family <- timbre: the level-normalised mean and spread of the
  log-mel spectrum over sounding frames, the levels of the partials relative to
  the tracked fundamental (pitch-free), and how the level moves frame to frame;
- tempo bucket <- rhythm: a histogram and quantiles of inter-onset intervals
  (spectral-flux peaks) and the onset envelope's autocorrelation at 0.1-2 s;
- mode <- tonality: pitch-class histograms (by duration and by onset strength)
  from a harmonic-sum pitch track, rotated to the best-matching
  Krumhansl-Kessler key, with the major and minor key-profile correlations.

The evaluation applies the probe to generated clips and compares its answers
with what the prompt asked for.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from musicrl.audio.features import MEL_FRAME_RATE, log_mel

SAMPLE_RATE = 16_000
TARGETS = ("tempo", "mode", "instrument")

# Krumhansl-Kessler key profiles, tonic first.
MAJOR_PROFILE = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
MINOR_PROFILE = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])

_PITCH_FFT, _PITCH_HOP = 2048, 512
_CANDIDATES = np.arange(36, 84)  # MIDI pitches the synthesizer can play
_HARMONICS = np.arange(1, 7)
_ONSET_LAGS = np.arange(5, 101)  # mel frames: 0.1 s .. 2 s
_IOI_EDGES = 2.0 ** np.arange(-3.5, 2.01, 0.25)  # seconds, quarter-octave bins from 0.09 s to 4 s
# Each attribute is read from the features that carry it, which also keeps the small probe from overfitting.
TARGET_FEATURES = {"tempo": "rhythm", "mode": "tonality", "instrument": "timbre"}


def timbre_features(mel: np.ndarray) -> np.ndarray:
    energy = mel.max(axis=0)
    sounding = mel[:, energy > energy.max() - 6.0] if mel.size else mel
    if sounding.shape[1] == 0:
        return np.zeros(2 * mel.shape[0])
    mean = sounding.mean(axis=1)
    return np.concatenate([mean - mean.max(), sounding.std(axis=1)])


def rhythm_features(mel: np.ndarray) -> np.ndarray:
    """Inter-onset-interval histogram and quantiles, and the onset envelope's autocorrelation."""
    flux = np.maximum(np.diff(mel, axis=1), 0.0).sum(axis=0) if mel.shape[1] > 1 else np.zeros(3)
    threshold = flux.mean() + flux.std()
    peaks = np.flatnonzero((flux[1:-1] > flux[:-2]) & (flux[1:-1] >= flux[2:]) & (flux[1:-1] > threshold)) + 1
    intervals = np.diff(peaks) / MEL_FRAME_RATE
    histogram = np.histogram(intervals, bins=_IOI_EDGES)[0] / max(1, len(intervals))
    quantiles = np.log2(np.percentile(intervals, [10, 25, 50, 75, 90])) if len(intervals) else np.zeros(5)
    envelope = flux - flux.mean()
    lag0 = float(envelope @ envelope) + 1e-9
    autocorr = np.array(
        [envelope[:-lag] @ envelope[lag:] / lag0 if lag < len(envelope) else 0.0 for lag in _ONSET_LAGS]
    )
    return np.concatenate([histogram, quantiles, autocorr])


@dataclass
class PitchTrack:
    magnitude: np.ndarray  # [frames, bins] STFT magnitude
    pitch: np.ndarray  # [frames] MIDI pitch of the most salient harmonic series
    salience: np.ndarray  # [frames]
    sounding: np.ndarray  # [frames] bool


def pitch_track(wave: np.ndarray) -> PitchTrack:
    """Harmonic-sum pitch per frame: the candidate whose first partials carry the most energy."""
    wave = np.pad(wave, (0, max(0, _PITCH_FFT - len(wave))))
    frames = np.lib.stride_tricks.sliding_window_view(wave, _PITCH_FFT)[::_PITCH_HOP]
    magnitude = np.abs(np.fft.rfft(frames * np.hanning(_PITCH_FFT), axis=-1))
    bins = np.minimum(
        np.rint(np.outer(_hz(_CANDIDATES), _HARMONICS) * _PITCH_FFT / SAMPLE_RATE).astype(int), magnitude.shape[1] - 1
    )
    salience = (magnitude[:, bins] / _HARMONICS).sum(axis=-1)  # [frames, candidates]
    best = salience.max(axis=1)
    return PitchTrack(magnitude, _CANDIDATES[salience.argmax(axis=1)], best, best > 0.05 * (best.max() + 1e-12))


def _hz(pitch: np.ndarray) -> np.ndarray:
    return 440.0 * 2.0 ** ((np.asarray(pitch, dtype=np.float64) - 69) / 12.0)


def partial_features(track: PitchTrack) -> np.ndarray:
    """Mean and spread of the partial levels (dB re the fundamental) at harmonic and bell-like ratios: pitch-free
    timbre."""
    ratios = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 2.756, 5.404, 1.5, 2.5])
    if not track.sounding.any():
        return np.zeros(2 * (len(ratios) - 1) + 4)
    frames = np.flatnonzero(track.sounding)
    bins = np.rint(np.outer(_hz(track.pitch[frames]), ratios) * _PITCH_FFT / SAMPLE_RATE).astype(int)
    valid = bins < track.magnitude.shape[1]
    levels = 20 * np.log10(track.magnitude[frames[:, None], np.minimum(bins, track.magnitude.shape[1] - 1)] + 1e-6)
    relative = np.where(valid, levels - levels[:, :1], -60.0)[:, 1:].clip(-60.0, 20.0)
    # envelope: how the level moves from frame to frame (decaying plucks vs sustained tones)
    level = 20 * np.log10(track.salience + 1e-6)
    change = np.diff(level[track.sounding]) if track.sounding.sum() > 1 else np.zeros(1)
    envelope = [np.mean(change < -1.0), np.mean(np.abs(change) <= 1.0), np.median(change), track.sounding.mean()]
    return np.concatenate([relative.mean(axis=0), relative.std(axis=0), envelope])


def tonality_features(track: PitchTrack, onset_weight: np.ndarray) -> np.ndarray:
    """Pitch-class histograms (by duration and by onset strength) rotated to the best key, with key correlations."""
    histograms = []
    for weight in (track.salience * track.sounding, track.salience * track.sounding * onset_weight):
        histogram = np.bincount(track.pitch % 12, weights=weight, minlength=12)
        histograms.append(histogram / (histogram.sum() + 1e-12))
    chroma = histograms[0] + histograms[1]
    major = np.array([_correlation(np.roll(chroma, -r), MAJOR_PROFILE) for r in range(12)])
    minor = np.array([_correlation(np.roll(chroma, -r), MINOR_PROFILE) for r in range(12)])
    tonic = int(np.argmax(np.maximum(major, minor)))
    rotated = [np.roll(h, -tonic) for h in histograms]
    return np.concatenate(rotated + [[major.max(), minor.max(), major[tonic], minor[tonic]]])


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 else 0.0


def _onset_weight(mel: np.ndarray, n_frames: int) -> np.ndarray:
    """Spectral flux resampled onto the pitch-track frames."""
    flux = np.concatenate([[0.0], np.maximum(np.diff(mel, axis=1), 0.0).sum(axis=0)]) if mel.shape[1] else np.zeros(1)
    positions = np.arange(n_frames) * _PITCH_HOP / SAMPLE_RATE * MEL_FRAME_RATE
    window = np.maximum.reduceat(flux, np.minimum(positions.astype(int), len(flux) - 1)) if n_frames else flux[:0]
    return window / (window.max() + 1e-12)


def probe_features(wave: np.ndarray) -> dict[str, np.ndarray]:
    """Feature groups of a 16 kHz mono waveform: ``timbre``, ``rhythm`` and ``tonality``."""
    wave = np.asarray(wave, dtype=np.float32)
    mel = log_mel(wave)
    track = pitch_track(wave)
    onset = _onset_weight(mel, len(track.pitch))
    return {
        "timbre": np.concatenate([timbre_features(mel), partial_features(track)]),
        "rhythm": rhythm_features(mel),
        "tonality": tonality_features(track, onset),
    }


def stack_features(features: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {group: np.stack([f[group] for f in features]).astype(np.float32) for group in features[0]}


def labels_of(attributes: dict) -> dict[str, str]:
    """What the probe predicts for a clip with these corpus attributes (the first instrument)."""
    return {"tempo": attributes["tempo"], "mode": attributes["mode"], "instrument": attributes["instruments"][0]}


@dataclass
class AttributeProbe:
    regularisation: float = 0.05  # inverse L2 strength of the logistic regressions
    models: dict[str, Pipeline] = field(default_factory=dict)

    def fit(self, features: dict[str, np.ndarray], labels: list[dict[str, str]]) -> AttributeProbe:
        for target, group in TARGET_FEATURES.items():
            model = make_pipeline(StandardScaler(), LogisticRegression(C=self.regularisation, max_iter=3000))
            self.models[target] = model.fit(features[group], [label[target] for label in labels])
        return self

    def predict(self, features: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {target: model.predict(features[TARGET_FEATURES[target]]) for target, model in self.models.items()}

    def classes(self, target: str) -> list[str]:
        return [str(c) for c in self.models[target].classes_]
