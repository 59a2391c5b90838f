"""Evaluate the generator: are the requested attributes audible, and is it faster than real time?

Writes the keys ``generator`` and ``attribute_recovery`` of ``results/models.json``
(merged under a file lock, leaving the other models' keys alone) and a PNG plot.

Attribute recovery: an :class:`~musicrl.models.attribute_probe.AttributeProbe`
is fitted on renders of training-split corpus clips, checked on renders of
held-out (test-split) corpus clips (the probe's own ceiling), then applied to
clips generated from held-out captions. Accuracy is reported against the
requested attributes, against the attributes of shuffled prompts (what the
same clips score when the prompt is ignored) and against chance (uniform and
majority class). Only single-instrument captions are used, so that every
target has one right answer.

Real-time factor = audio seconds produced per wall-clock second, on one thread
at batch 1 (> 1 is faster than real time), for sampling and for decoding.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from musicrl.audio import codec
from musicrl.checkpoint import merge_json
from musicrl.models.attribute_probe import TARGETS, AttributeProbe, labels_of, probe_features, stack_features
from musicrl.models.generator import Generator, load_generator

SHOWCASE_PROMPT = "a slow, sad piano melody in a minor key"
SHOWCASE_LABELS = {"tempo": "slow", "mode": "minor", "instrument": "piano"}


@dataclass
class GeneratorEvaluationConfig:
    checkpoint: Path = Path("checkpoints/generator")
    results: Path = Path("results/models.json")
    plot: Path = Path("results/generator_attribute_recovery.png")
    n_probe_train: int = 600
    n_probe_test: int = 200
    n_prompts: int = 400  # ~330 single-instrument ones: a 95 % interval of about +-5 points
    n_showcase: int = 8
    duration_s: float = 10.0
    temperature: float = 0.99
    top_k: int = 0
    # further (temperature, top_k) settings scored with the same probe and prompts
    other_sampling: tuple[tuple[float, int], ...] = ((0.99, 20), (0.7, 0))
    batch_size: int = 16
    rtf_repeats: int = 5
    corpus_seed: int = 0
    seed: int = 0
    progress: bool = True


def _single_instrument(records):
    return [r for r in records if len(r.attributes["instruments"]) == 1]


def _features(waves, desc: str, progress: bool) -> dict[str, np.ndarray]:
    return stack_features([probe_features(w) for w in tqdm(waves, desc=desc, disable=not progress)])


def _accuracy(predicted: np.ndarray, expected: list[str]) -> float:
    return float(np.mean(predicted == np.asarray(expected)))


def _interval(predicted: np.ndarray, expected: list[str]) -> list[float]:
    """Wilson 95 % interval of the accuracy."""
    from scipy.stats import binomtest  # noqa: PLC0415

    ci = binomtest(int(np.sum(predicted == np.asarray(expected))), len(expected)).proportion_ci(method="wilson")
    return [float(ci.low), float(ci.high)]


def _shuffled_accuracy(predicted: np.ndarray, requested: list[str], seed: int, repeats: int = 20) -> float:
    """Accuracy against the attributes of other prompts: what a generator that ignores its prompt scores."""
    rng = np.random.default_rng(seed)
    return float(np.mean([_accuracy(predicted, list(rng.permutation(requested))) for _ in range(repeats)]))


def _generated_scores(predicted: np.ndarray, requested: list[str], seed: int) -> dict:
    """Accuracy of generated clips against what their prompts asked for, its interval, and the shuffled-prompt
    baseline."""
    return {
        "generated_accuracy": _accuracy(predicted, requested),
        "generated_accuracy_ci95": _interval(predicted, requested),
        "generated_accuracy_shuffled_prompts": _shuffled_accuracy(predicted, requested, seed),
    }


def _chance(expected: list[str], classes: list[str]) -> dict[str, float]:
    values, counts = np.unique(expected, return_counts=True)
    return {
        "uniform": 1.0 / len(classes),
        "majority": float(counts.max() / counts.sum()),
        "majority_class": str(values[counts.argmax()]),
    }


def _generate_audio(
    model: Generator,
    cond: np.ndarray,
    seeds: list[int],
    config: GeneratorEvaluationConfig,
    desc: str,
    sampling: tuple[float, int] | None = None,
) -> list[np.ndarray]:
    temperature, top_k = sampling or (config.temperature, config.top_k)
    n_frames = codec.frames_for(config.duration_s)
    waves = []
    for start in tqdm(range(0, len(seeds), config.batch_size), desc=desc, disable=not config.progress):
        chunk = slice(start, start + config.batch_size)
        tokens, _ = model.sample(torch.from_numpy(cond[chunk]), n_frames, temperature, top_k, seeds[chunk])
        waves += [codec.decode(row) for row in tokens.numpy()]
    return waves


def attribute_recovery(model: Generator, text_encoder, config: GeneratorEvaluationConfig) -> dict:
    from musicrl.corpus import make_corpus  # noqa: PLC0415

    duration = config.duration_s
    probe_train = _single_instrument(make_corpus(config.n_probe_train, config.corpus_seed, "train", duration))
    probe_test = _single_instrument(make_corpus(config.n_probe_test, config.corpus_seed, "test", duration))
    # Prompts come from another corpus seed than the probe's test clips: captions the generator never saw.
    prompts = _single_instrument(make_corpus(config.n_prompts, config.corpus_seed + 1, "test", duration))

    probe = AttributeProbe().fit(
        _features([r.render() for r in probe_train], "probe: train renders", config.progress),
        [labels_of(r.attributes) for r in probe_train],
    )
    on_corpus = probe.predict(_features([r.render() for r in probe_test], "probe: held-out renders", config.progress))

    requested = {target: [labels_of(r.attributes)[target] for r in prompts] for target in TARGETS}
    cond = text_encoder.embed([r.caption for r in prompts])
    seeds = [config.seed + i for i in range(len(prompts))]
    generated = probe.predict(
        _features(_generate_audio(model, cond, seeds, config, "generating"), "probe: generated", config.progress)
    )

    showcase_cond = np.repeat(text_encoder.embed([SHOWCASE_PROMPT]), config.n_showcase, axis=0)
    showcase_seeds = [config.seed + i for i in range(config.n_showcase)]
    showcase = probe.predict(
        _features(
            _generate_audio(model, showcase_cond, showcase_seeds, config, "showcase"),
            "probe: showcase",
            config.progress,
        )
    )

    other_sampling = {}
    for temperature, top_k in config.other_sampling:
        waves = _generate_audio(
            model, cond, seeds, config, f"generating T={temperature} k={top_k}", (temperature, top_k)
        )
        predicted = probe.predict(_features(waves, "probe: generated", config.progress))
        other_sampling[f"temperature={temperature},top_k={top_k}"] = {
            target: _generated_scores(predicted[target], requested[target], config.seed) for target in TARGETS
        }

    targets = {}
    for target in TARGETS:
        targets[target] = {
            "classes": probe.classes(target),
            "probe_accuracy_on_heldout_corpus": _accuracy(
                on_corpus[target], [labels_of(r.attributes)[target] for r in probe_test]
            ),
            **_generated_scores(generated[target], requested[target], config.seed),
            "chance": _chance(requested[target], probe.classes(target)),
        }
    return {
        "description": "accuracy of an audio-only attribute probe "
        "(logistic regression on timbre/rhythm/tonality features, "
        "fitted on corpus renders) on clips generated from held-out single-instrument captions",
        "n_probe_train": len(probe_train),
        "n_probe_heldout": len(probe_test),
        "n_prompts": len(prompts),
        "duration_s": duration,
        "temperature": config.temperature,
        "top_k": config.top_k,
        "targets": targets,
        "other_sampling": other_sampling,
        "showcase": {
            "prompt": SHOWCASE_PROMPT,
            "n_clips": config.n_showcase,
            "share_recovered": {t: float(np.mean(showcase[t] == SHOWCASE_LABELS[t])) for t in TARGETS},
            "predictions": {t: [str(x) for x in showcase[t]] for t in TARGETS},
        },
    }


def real_time_factors(model: Generator, text_encoder, config: GeneratorEvaluationConfig) -> dict:
    """Audio seconds per wall-clock second on one thread (median over repeats)."""
    cond = torch.from_numpy(text_encoder.embed([SHOWCASE_PROMPT]))
    n_frames = codec.frames_for(config.duration_s)
    model.sample(cond, 4, seeds=[0])  # warm-up
    sample_s, decode_s, pair_s = [], [], []
    for repeat in range(config.rtf_repeats):
        started = time.perf_counter()
        tokens, _ = model.sample(cond, n_frames, config.temperature, config.top_k, [repeat])
        sample_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        codec.decode(tokens[0].numpy())
        decode_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        model.sample(cond.repeat(2, 1), n_frames, config.temperature, config.top_k, [repeat, repeat + 1])
        pair_s.append(time.perf_counter() - started)
    sample, decode, pair = float(np.median(sample_s)), float(np.median(decode_s)), float(np.median(pair_s))
    return {
        "threads": torch.get_num_threads(),
        "clip_s": config.duration_s,
        "sample_seconds_batch1": sample,
        "decode_seconds": decode,
        "rtf_generation_batch1": config.duration_s / sample,
        "rtf_decoding": config.duration_s / decode,
        "rtf_generation_plus_decoding_batch1": config.duration_s / (sample + decode),
        "rtf_generation_batch2_per_clip": 2 * config.duration_s / pair,
    }


def plot_recovery(recovery: dict, rtf: dict, path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    def generated(scores: dict) -> tuple[list[float], list[list[float]]]:
        """Accuracies and their error-bar lengths below and above."""
        values = [scores[t]["generated_accuracy"] for t in TARGETS]
        return values, [
            [v - scores[t]["generated_accuracy_ci95"][0] for t, v in zip(TARGETS, values)],
            [scores[t]["generated_accuracy_ci95"][1] - v for t, v in zip(TARGETS, values)],
        ]

    bars = [
        (
            "probe on held-out corpus renders",
            [recovery["targets"][t]["probe_accuracy_on_heldout_corpus"] for t in TARGETS],
            None,
        ),
        (f"generated (T={recovery['temperature']}, top-k {recovery['top_k']})", *generated(recovery["targets"])),
    ]
    for setting, scores in recovery.get("other_sampling", {}).items():
        bars.append((f"generated ({setting})", *generated(scores)))
    bars.append(
        (
            "generated, vs shuffled prompts",
            [recovery["targets"][t]["generated_accuracy_shuffled_prompts"] for t in TARGETS],
            None,
        )
    )
    fig, ax = plt.subplots(figsize=(9, 5.6))
    x = np.arange(len(TARGETS))
    width = 0.8 / len(bars)
    for i, (label, values, errors) in enumerate(bars):
        ax.bar(x + (i - (len(bars) - 1) / 2) * width, values, width, yerr=errors, capsize=3, label=label)
    for j, target in enumerate(TARGETS):
        chance = recovery["targets"][target]["chance"]["majority"]
        ax.hlines(
            chance, j - 0.4, j + 0.4, colors="k", linestyles="--", label="chance (majority class)" if j == 0 else None
        )
    ax.set_xticks(x, [f"{t}\n({len(recovery['targets'][t]['classes'])} classes)" for t in TARGETS])
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(
        f"Attributes recovered from generated audio ({recovery['n_prompts']} held-out prompts, 95 % intervals)\n"
        f"generation RTF {rtf['rtf_generation_batch1']:.0f}x, decoding RTF {rtf['rtf_decoding']:.0f}x "
        "(1 thread, batch 1)"
    )
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def evaluate_generator(config: GeneratorEvaluationConfig) -> dict:
    from musicrl.text import load_text_encoder  # noqa: PLC0415

    torch.set_num_threads(1)
    model, meta = load_generator(config.checkpoint)
    text_encoder = load_text_encoder(model.config.text_encoder)
    rtf = real_time_factors(model, text_encoder, config)
    recovery = attribute_recovery(model, text_encoder, config)
    generator = {
        "checkpoint": str(config.checkpoint),
        "version": meta.get("version"),
        "parameters": model.num_parameters(),
        "config": {
            k: getattr(model.config, k)
            for k in ("n_layers", "n_heads", "d_model", "max_frames", "vocab_size", "text_encoder")
        },
        "training": meta.get("metrics", {}),
        "real_time_factor": rtf,
    }
    merge_json(config.results, {"generator": generator, "attribute_recovery": recovery})
    plot_recovery(recovery, rtf, config.plot)
    return {"generator": generator, "attribute_recovery": recovery}
