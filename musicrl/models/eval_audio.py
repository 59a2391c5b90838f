"""Evaluation of the codec, the text-adherence and the quality models on held-out data.

Writes (merging, other keys untouched) the keys "codec", "text_adherence" and
"quality" of results/models.json, and PNG plots under results/.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from musicrl.audio import codec
from musicrl.audio.degrade import DEGRADATIONS, render_degraded
from musicrl.audio.features import log_mel
from musicrl.audio.formats import decode_audio, encode_audio
from musicrl.checkpoint import merge_json
from musicrl.corpus import make_corpus
from musicrl.models.train_audio import retrieval_metrics


def evaluate_codec(n: int, seed: int) -> dict:
    records = make_corpus(n, seed=seed, split="test")
    codec.decode(records[0].tokens), codec.encode(records[0].render())  # warm caches
    audio_s = sum(len(r.tokens) for r in records) / codec.FRAME_RATE
    start = time.perf_counter()
    waves = [codec.decode(r.tokens) for r in records]
    decode_s = time.perf_counter() - start
    start = time.perf_counter()
    encoded = [codec.encode(w) for w in waves]
    encode_s = time.perf_counter() - start
    clean = [np.mean(e == codec.canonical(r.tokens)) for e, r in zip(encoded, records, strict=True)]
    mp3 = []
    for wave, record in zip(waves, records, strict=True):
        decoded, sr = decode_audio(encode_audio(wave, codec.SAMPLE_RATE, "mp3"))
        mp3.append(np.mean(codec.encode(decoded[: len(wave)], sr) == codec.canonical(record.tokens)))
    return {
        "clips": n,
        "audio_seconds": audio_s,
        "frame_rate": codec.FRAME_RATE,
        "vocab_size": codec.VOCAB_SIZE,
        "decode_real_time_factor": audio_s / decode_s,
        "encode_real_time_factor": audio_s / encode_s,
        "round_trip_token_accuracy_clean": float(np.mean(clean)),
        "round_trip_token_accuracy_mp3": float(np.mean(mp3)),
        "note": "real-time factor = seconds of audio per second of one-core wall time (> 1 is faster than real time)",
    }


def _speed(fn, mels: np.ndarray, repeats: int = 3) -> float:
    fn(mels[:1])
    start = time.perf_counter()
    for _ in range(repeats):
        for row in mels:
            fn(row[None])
    return (time.perf_counter() - start) / (repeats * len(mels))


def evaluate_text_adherence(n: int, seed: int, checkpoints: Path, results_dir: Path) -> dict:
    from musicrl.rewards.loader import load_reward_models

    onnx = load_reward_models(
        checkpoints, impl={"text_adherence": "onnx", "quality": "tiny", "preference": "tiny"}, text_encoder="minilm"
    )
    torch_models = load_reward_models(
        checkpoints, impl={"text_adherence": "torch", "quality": "tiny", "preference": "tiny"}, text_encoder="minilm"
    )
    records = make_corpus(n, seed=seed, split="test")
    mels = np.stack([log_mel(r.render()) for r in tqdm(records, desc="render test", leave=False)])
    text = onnx.text_encoder.embed([r.caption for r in records])
    audio = onnx.text_adherence.embed_audio(mels)
    metrics = retrieval_metrics(audio, text)
    similarity = audio @ text.T
    torch_audio = torch_models.text_adherence.embed_audio(mels[:16])
    onnx_s, torch_s = (
        _speed(onnx.text_adherence.embed_audio, mels[:16]),
        _speed(torch_models.text_adherence.embed_audio, mels[:16]),
    )
    result = {
        "version": onnx.text_adherence.version,
        "split": "test",
        "pool_size": n,
        "retrieval_top1": metrics["top1"],
        "retrieval_top5": metrics["top5"],
        "chance_top1": metrics["chance_top1"],
        "chance_top5": metrics["chance_top5"],
        "top5_over_chance": metrics["top5"] / metrics["chance_top5"],
        "cosine_matched_mean": float(np.mean(np.diag(similarity))),
        "cosine_mismatched_mean": float((similarity.sum() - np.trace(similarity)) / (n * n - n)),
        "onnx_vs_torch_max_abs_diff": float(np.abs(audio[:16] - torch_audio).max()),
        "onnx_ms_per_10s_clip": 1000 * onnx_s,
        "torch_ms_per_10s_clip": 1000 * torch_s,
        "onnx_speedup_vs_torch": torch_s / onnx_s,
    }
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    image = axes[0].imshow(similarity[:40, :40], cmap="viridis")
    axes[0].set(title="audio-caption cosine, 40 held-out clips", xlabel="caption", ylabel="clip")
    fig.colorbar(image, ax=axes[0])
    ranks = (similarity > np.diag(similarity)[:, None]).sum(axis=1)
    axes[1].hist(ranks, bins=np.arange(0, n + 1, max(1, n // 40)), color="tab:blue")
    axes[1].axvline(n / 2, color="gray", linestyle="--", label="chance (mean rank)")
    axes[1].set(
        title=f"true caption's rank of {n}: top-5 {metrics['top5']:.2f} (chance {metrics['chance_top5']:.3f})",
        xlabel="rank",
        ylabel="clips",
    )
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(results_dir / "text_adherence_retrieval.png", dpi=110)
    plt.close(fig)
    return result


def evaluate_quality(n: int, seed: int, checkpoints: Path, results_dir: Path) -> dict:
    from scipy.stats import spearmanr

    from musicrl.rewards.loader import load_reward_models

    models = load_reward_models(
        checkpoints, impl={"text_adherence": "tiny", "quality": "onnx", "preference": "tiny"}, text_encoder="hashing"
    )
    torch_models = load_reward_models(
        checkpoints, impl={"text_adherence": "tiny", "quality": "torch", "preference": "tiny"}, text_encoder="hashing"
    )
    records = make_corpus(n, seed=seed, split="test")
    rng = np.random.default_rng([seed, 11])
    kinds = [DEGRADATIONS[i % len(DEGRADATIONS)] for i in range(n)]
    strengths = rng.random(n)
    mels = np.stack(
        [
            log_mel(render_degraded(r.tokens, {k: s}, rng))
            for r, k, s in tqdm(list(zip(records, kinds, strengths, strict=True)), desc="degrade test", leave=False)
        ]
    )
    clean_mels = np.stack([log_mel(r.render()) for r in records[:50]])
    predicted = models.quality.mos(mels)
    clean = models.quality.mos(clean_mels)
    per_kind = {
        k: float(-spearmanr(predicted[np.array(kinds) == k], strengths[np.array(kinds) == k]).statistic)
        for k in DEGRADATIONS
    }
    onnx_s, torch_s = _speed(models.quality.mos, mels[:16]), _speed(torch_models.quality.mos, mels[:16])
    result = {
        "version": models.quality.version,
        "split": "test",
        "clips": n,
        "spearman_mos_vs_strength": float(-spearmanr(predicted, strengths).statistic),
        "spearman_by_degradation": per_kind,
        "clean_mos_mean": float(clean.mean()),
        "degraded_mos_mean": float(predicted.mean()),
        "mae_vs_label": float(np.mean(np.abs(predicted - (1 + 4 * (1 - strengths))))),
        "onnx_vs_torch_max_abs_diff": float(np.abs(predicted[:16] - torch_models.quality.mos(mels[:16])).max()),
        "onnx_ms_per_10s_clip": 1000 * onnx_s,
        "torch_ms_per_10s_clip": 1000 * torch_s,
        "onnx_speedup_vs_torch": torch_s / onnx_s,
        "note": "spearman_* is the rank correlation of predicted MOS with minus the degradation strength (1 = perfect)",
    }
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind in DEGRADATIONS:
        mask = np.array(kinds) == kind
        ax.scatter(strengths[mask], predicted[mask], s=12, label=f"{kind} ({per_kind[kind]:.2f})")
    ax.plot([0, 1], [5, 1], color="gray", linestyle="--", label="label MOS")
    ax.set(
        xlabel="degradation strength",
        ylabel="predicted MOS",
        title=f"quality model on held-out clips: Spearman {result['spearman_mos_vs_strength']:.3f}",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(results_dir / "quality_vs_strength.png", dpi=110)
    plt.close(fig)
    return result


def evaluate(
    checkpoints: Path = Path("checkpoints"),
    results: Path = Path("results/models.json"),
    n_retrieval: int = 200,
    n_quality: int = 480,
    n_codec: int = 20,
    seed: int = 0,
) -> dict:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    results_dir = Path(results).parent
    results_dir.mkdir(parents=True, exist_ok=True)
    updates = {
        "codec": evaluate_codec(n_codec, seed),
        "text_adherence": evaluate_text_adherence(n_retrieval, seed, Path(checkpoints), results_dir),
        "quality": evaluate_quality(n_quality, seed, Path(checkpoints), results_dir),
    }
    merge_json(Path(results), updates)
    return updates
