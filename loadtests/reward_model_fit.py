"""Which preference reward-model fit learns the users' taste from a few hundred votes?

And how often would the cycle's own check (an out-of-sample accuracy above 0.5) wrongly
refuse it? Offline, with the project's code paths and none of the servers:

1. **Pairs.** Two clips per prompt from the committed base generator (``checkpoints/generator``,
   5 s, temperature 0.99, seeded per clip) judged by a listener of the default population
   (``Population(ListenerConfig.for_taste("default", size=200), seed)``) on full listens who
   always votes (a, b or tie): the usable part of what the loop collects. The training pool
   (``pool_pairs``) uses corpus ``train`` captions; the test pairs (``test_pairs``) use ``test``
   captions, so the two never share a prompt, and are judged by the *held-out* population
   (``.held_out()``: same taste distribution, other people).
2. **Fits.** For each size (110 = a demo's usable preferences, 230 = a closed-loop round's) and
   draw, ``size`` pairs are sampled from the pool, split 80/20 by generation id as a cycle splits
   its buffer (``musicrl.buffer.split_of``), and the reward model is fitted three ways through
   ``reward_model_from_settings`` (the cycle's call):

   - ``probe``: ``FinetuneSettings()`` (``finetune_rm_fit="probe"``, the default): frozen
     generator trunk, L2 linear heads, decided on the 5-fold cross-validated accuracy;
   - ``finetune``: the paper's fine-tuning from the generator (``finetune_rm_fit="finetune"``,
     AdamW, 4 epochs, lr 3e-4, best epoch kept), decided on the held-out fifth;
   - ``finetune_warm_bootstrap``: the same, continuing the committed bootstrap model
     (``checkpoints/preference``, ``load_warm_start``): what earlier cycles did.

   Each fit gets its accuracy on the test pairs, the out-of-sample accuracy the cycle decides on
   (``heldout_accuracy``), whether the cycle would use it (``> 0.5``) and its seconds (fit and
   ONNX export, one torch thread as the stack runs the worker).
3. **Baselines** on the same test pairs: the committed bootstrap model as is, and the oracle
   (the mean listener's utility, ``pop.mean_listener().utility(wave)``: the ceiling).

``musicrl experiment reward-model-fit``; results in ``results/reward_model_fit.json`` and
``results/reward_model_fit.png`` (docs/closed_loop.md).
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FITS = ("probe", "finetune", "finetune_warm_bootstrap")
FIT_LABELS = {
    "probe": "probe (default)",
    "finetune": "finetune (from generator)",
    "finetune_warm_bootstrap": "finetune (warm, bootstrap)",
}
DEMO_PREFERENCES = 110  # usable preferences of one `make demo`
ROUND_PREFERENCES = 230  # usable preferences one closed-loop round lands on the current policy
QUESTION = (
    "which reward-model fit learns the users' taste from a few hundred votes, "
    "and how often would its check wrongly refuse it"
)
_STREAMS = {"train": 1, "test": 2}  # random streams (prompts, clip seeds, listeners) of the pool and the test pairs
_BATCH = 32


@dataclass
class RewardModelFitConfig:
    pool_pairs: int = 600
    test_pairs: int = 600
    sizes: tuple[int, ...] = (DEMO_PREFERENCES, ROUND_PREFERENCES)
    draws: int = 6
    seed: int = 0
    clip_s: float = 5.0
    temperature: float = 0.99
    population: str = "default"
    population_size: int = 200
    captions: int = 200  # corpus captions per split the prompts are drawn from (with replacement)
    heldout_fraction: float | None = None  # None: FinetuneSettings.finetune_heldout_fraction

    def validate(self) -> None:
        if not self.sizes:
            raise ValueError("no sizes given")
        if min(self.sizes) < 5:
            raise ValueError(
                f"sizes must be at least 5 pairs (the probe's 5-fold cross-validation), got {min(self.sizes)}"
            )
        if max(self.sizes) > self.pool_pairs:
            raise ValueError(f"size {max(self.sizes)} is larger than the training pool ({self.pool_pairs} pairs)")
        if self.draws < 1 or self.test_pairs < 1:
            raise ValueError("draws and test pairs must be at least 1")


# --------------------------------------------------------------------------- pairs


@dataclass
class JudgedPairs:
    """Bradley-Terry pairs (preferred first, ties kept) with what the cycle and the oracle need."""

    pairs: list = field(default_factory=list)  # PreferencePair
    prompts: list[str] = field(default_factory=list)
    generation_ids: list[str] = field(default_factory=list)
    oracle_margins: list[float] = field(default_factory=list)  # mean listener: utility(preferred) - utility(other)
    votes: Counter = field(default_factory=Counter)

    def subset(self, indices: Sequence[int]) -> JudgedPairs:
        picked = [int(i) for i in indices]
        return JudgedPairs(
            [self.pairs[i] for i in picked],
            [self.prompts[i] for i in picked],
            [self.generation_ids[i] for i in picked],
            [self.oracle_margins[i] for i in picked],
            Counter("tie" if self.pairs[i].tie else "decided" for i in picked),
        )


def full_listen_vote(listener, utility_a: float, utility_b: float, draw: float) -> str:
    """'a', 'b' or 'tie' of ``listener`` having heard both clips in full and voting (``Listener.judge`` without
    the early stops, skips and abstentions); ``draw`` is uniform in [0, 1)."""
    p = listener.outcome_probabilities(utility_a, utility_b)
    return "tie" if draw < p["tie"] else "a" if draw < p["tie"] + p["a"] else "b"


def judged_pairs(
    generator,
    embed: Callable[[list[str]], np.ndarray],
    split: str,
    n: int,
    population,
    config: RewardModelFitConfig,
    progress=None,
) -> JudgedPairs:
    """``n`` pairs of base-generator clips on prompts of the corpus ``split``, judged by ``population``."""
    import torch

    from musicrl.audio import codec
    from musicrl.corpus.dataset import make_corpus
    from musicrl.models.preference import PreferencePair

    stream = _STREAMS[split]
    captions = [r.caption for r in make_corpus(config.captions, seed=config.seed, split=split, duration_s=1.0)]
    rng = np.random.default_rng([config.seed, stream])
    prompts = [captions[int(i)] for i in rng.integers(len(captions), size=n)]
    cond_all = np.asarray(embed(prompts), dtype=np.float32)
    mean = population.mean_listener()
    n_frames = codec.frames_for(config.clip_s)
    base_seed = (config.seed * 10 + stream) * 10**6
    out = JudgedPairs()
    generator.eval()
    with torch.no_grad():
        for start in range(0, n, _BATCH):
            cond = torch.from_numpy(cond_all[start : start + _BATCH])
            seeds = [base_seed + 2 * (start + i) for i in range(len(cond))]
            tokens_a, _ = generator.sample(cond, n_frames, config.temperature, 0, seeds)
            tokens_b, _ = generator.sample(cond, n_frames, config.temperature, 0, [s + 1 for s in seeds])
            for i in range(len(cond)):
                ta, tb = tokens_a[i].cpu().numpy(), tokens_b[i].cpu().numpy()
                wave_a, wave_b = codec.decode(ta), codec.decode(tb)
                listener = population.sample(rng)
                choice = full_listen_vote(
                    listener, listener.utility(wave_a), listener.utility(wave_b), float(rng.random())
                )
                (win, u_win), (lose, u_lose) = (
                    ((tb, mean.utility(wave_b)), (ta, mean.utility(wave_a)))
                    if choice == "b"
                    else ((ta, mean.utility(wave_a)), (tb, mean.utility(wave_b)))
                )
                index = start + i
                out.pairs.append(
                    PreferencePair(cond_all[index], win.astype(np.int64), lose.astype(np.int64), choice == "tie")
                )
                out.prompts.append(prompts[index])
                out.generation_ids.append(f"rm-fit-{config.seed}-{split}-{index}")
                out.oracle_margins.append(float(u_win - u_lose))
                out.votes[choice] += 1
                if progress is not None:
                    progress.update(1)
    return out


def margin_accuracy(margins: Sequence[float], ties: Sequence[bool]) -> float:
    """Pairwise accuracy of margins (preferred - other) on the decided pairs; a zero margin counts half
    (as ``evaluate_pairs``)."""
    decided = np.asarray([m for m, t in zip(margins, ties) if not t], dtype=np.float64)
    if not len(decided):
        return float("nan")
    return float(np.mean((decided > 0) + 0.5 * (decided == 0)))


def split_like_the_cycle(sample: JudgedPairs, heldout_fraction: float):
    """(train, held-out) ``BufferPairs``, split by generation id as ``select_pair_rows`` splits the buffer."""
    from finetune_worker.reward_model import BufferPairs
    from musicrl.buffer import split_of

    parts = {"train": BufferPairs([], [], []), "eval": BufferPairs([], [], [])}
    for pair, prompt, gid in zip(sample.pairs, sample.prompts, sample.generation_ids):
        part = parts[split_of(gid, heldout_fraction)]
        part.pairs.append(pair)
        part.prompts.append(prompt)
        part.generation_ids.append(gid)
    return parts["train"], parts["eval"]


# --------------------------------------------------------------------------- fits


def fit_settings(base, fit: str, draw: int, seed: int):
    """The settings of one fit: ``base`` (``FinetuneSettings``) with the fit and a seed per draw."""
    return base.model_copy(
        update={"finetune_rm_fit": "probe" if fit == "probe" else "finetune", "finetune_seed": seed + draw}
    )


def fit_once(
    fit: str, settings, generator, train, heldout, test: list, bootstrap_dir: Path, out_dir: Path
) -> dict[str, Any]:
    """Fit one reward model as the cycle would; its test accuracy, the accuracy the cycle decides on, seconds."""
    from finetune_worker.reward_model import load_warm_start, reward_model_from_settings
    from musicrl.models.preference import evaluate_pairs, load_preference_model

    s = settings
    started = time.perf_counter()
    start = None
    if fit == "finetune_warm_bootstrap":
        start, why = load_warm_start(
            bootstrap_dir,
            generator,
            s.finetune_rm_heads,
            s.finetune_rm_disagreement_penalty,
            heldout_fraction=s.finetune_heldout_fraction,
            seed=s.finetune_seed,
        )
        if start is None:
            return {"skipped": why}
    metrics, _ = reward_model_from_settings(
        s,
        generator,
        train,
        heldout,
        None,
        out_dir,
        start=start,
        meta={"benchmark": "reward_model_fit", "fit": fit},
        progress=False,
    )
    seconds = time.perf_counter() - started
    model, _ = load_preference_model(out_dir)  # the saved model, as the reward service would load it
    test_accuracy = evaluate_pairs(model, test)["accuracy"]
    shutil.rmtree(out_dir, ignore_errors=True)
    decision = float(metrics["heldout_accuracy"])
    passes = bool(decision > 0.5)  # NaN (no decided held-out pair) does not pass, as in the cycle
    # FinetuneCycle.update_reward_model: a warm start no epoch improved on is kept; otherwise the check decides
    kept = start is not None and metrics.get("best_epoch") == 0
    row = {
        "test_accuracy": float(test_accuracy),
        "decision_accuracy": decision,
        "passes": passes,
        "cycle_decision": "keep start" if kept else "publish" if passes else "refuse",
        "seconds": round(seconds, 2),
        "n_train_pairs": int(metrics["n_train_pairs"]),
        "train_accuracy": float(metrics.get("train_accuracy", float("nan"))),
    }
    if "best_epoch" in metrics:
        row["best_epoch"] = int(metrics["best_epoch"])
    return row


# --------------------------------------------------------------------------- summary


def _mean(values: Sequence[float]) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(values)) if values else None


def summarize(rows: list[dict[str, Any]], sizes: Sequence[int], fits: Sequence[str] = FITS) -> list[dict[str, Any]]:
    """Per size x fit over the draws: test accuracy mean and (population) std, the decision accuracy's mean and
    lowest, pass rate, wrong refusals (refused though better than chance on the test pairs), wrong passes
    (used though no better than chance), mean seconds; skipped draws are counted apart."""
    out = []
    for size in sizes:
        for fit in fits:
            mine = [r for r in rows if r["size"] == size and r["fit"] == fit]
            done = [r for r in mine if "skipped" not in r]
            accuracies = [r["test_accuracy"] for r in done]
            decisions = [r["decision_accuracy"] for r in done]
            finite = [d for d in decisions if d is not None and math.isfinite(d)]
            n = len(done)
            out.append(
                {
                    "size": size,
                    "fit": fit,
                    "draws": n,
                    "skipped": len(mine) - n,
                    "test_accuracy_mean": _mean(accuracies),
                    "test_accuracy_std": float(np.std(accuracies)) if accuracies else None,
                    "test_accuracy_min": float(min(accuracies)) if accuracies else None,
                    "decision_accuracy_mean": _mean(decisions),
                    "decision_accuracy_min": float(min(finite)) if finite else None,
                    "pass_rate": sum(r["passes"] for r in done) / n if n else None,
                    "wrong_refusal_rate": sum((not r["passes"]) and r["test_accuracy"] > 0.5 for r in done) / n
                    if n
                    else None,
                    "wrong_pass_rate": sum(r["passes"] and not r["test_accuracy"] > 0.5 for r in done) / n
                    if n
                    else None,
                    "seconds_mean": _mean([r["seconds"] for r in done]),
                }
            )
    return out


def _finite(value: Any) -> Any:
    """NaN and infinities as null, recursively (strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


# --------------------------------------------------------------------------- the run


def run_reward_model_fit(
    config: RewardModelFitConfig,
    *,
    generator=None,
    embed: Callable[[list[str]], np.ndarray] | None = None,
    bootstrap_dir: Path | None = None,
    settings=None,
    progress: bool = True,
) -> dict[str, Any]:
    """The experiment; defaults: the committed generator and bootstrap model, ``FinetuneSettings()``."""
    import torch
    from tqdm.auto import tqdm

    from finetune_worker.settings import FinetuneSettings
    from finetune_worker.stack_component import CHECKPOINTS
    from finetune_worker.train import make_embed
    from loadtests.closed_loop import machine
    from musicrl.listeners import ListenerConfig, Population
    from musicrl.models.generator import load_generator
    from musicrl.models.preference import evaluate_pairs, load_preference_model

    config.validate()
    torch.set_num_threads(1)  # as the stack runs the worker
    base = settings if settings is not None else FinetuneSettings()
    if config.heldout_fraction is not None:
        base = base.model_copy(update={"finetune_heldout_fraction": config.heldout_fraction})
    generator_dir = CHECKPOINTS / "generator"
    if generator is None:
        generator, _ = load_generator(generator_dir)
    generator.eval()
    bootstrap_dir = Path(bootstrap_dir) if bootstrap_dir is not None else CHECKPOINTS / "preference"
    embed = embed if embed is not None else make_embed(base.finetune_text_encoder)

    population = Population(ListenerConfig.for_taste(config.population, size=config.population_size), seed=config.seed)
    started = time.perf_counter()
    with tqdm(total=config.pool_pairs + config.test_pairs, desc="judged pairs", disable=not progress) as bar:
        pool = judged_pairs(generator, embed, "train", config.pool_pairs, population, config, bar)
        test = judged_pairs(generator, embed, "test", config.test_pairs, population.held_out(), config, bar)
    data_s = time.perf_counter() - started
    test_ties = [p.tie for p in test.pairs]
    bootstrap, _ = load_preference_model(bootstrap_dir)
    baselines = {
        "bootstrap_as_is": float(evaluate_pairs(bootstrap, test.pairs)["accuracy"]),
        "oracle_mean_listener": margin_accuracy(test.oracle_margins, test_ties),
        "chance": 0.5,
    }
    del bootstrap

    rows: list[dict[str, Any]] = []
    sizes = list(config.sizes)
    with (
        tempfile.TemporaryDirectory(prefix="musicrl-rm-fit-") as work,
        tqdm(total=len(sizes) * config.draws * len(FITS), desc="reward-model fits", disable=not progress) as bar,
    ):
        for size in sizes:
            for draw in range(config.draws):
                rng = np.random.default_rng([config.seed, size, draw])
                sample = pool.subset(rng.choice(len(pool.pairs), size=size, replace=False))
                train, heldout = split_like_the_cycle(sample, base.finetune_heldout_fraction)
                for k, fit in enumerate(FITS):
                    s = fit_settings(base, fit, draw, config.seed)
                    # a fresh model's heads are drawn from torch's global generator before training seeds it:
                    # seed it here so that a rerun fits the same models
                    torch.manual_seed(int(np.random.default_rng([config.seed, size, draw, k]).integers(2**31)))
                    result = fit_once(
                        fit,
                        s,
                        generator,
                        train,
                        heldout,
                        test.pairs,
                        bootstrap_dir,
                        Path(work) / f"{fit}_{size}_{draw}",
                    )
                    rows.append(
                        {
                            "size": size,
                            "draw": draw,
                            "fit": fit,
                            "finetune_seed": s.finetune_seed,
                            "n_heldout_split": len(heldout.pairs),
                            **result,
                        }
                    )
                    bar.update(1)

    settings_used = {
        k: getattr(base, k)
        for k in (
            "finetune_rm_l2",
            "finetune_rm_cv_folds",
            "finetune_rm_lr",
            "finetune_rm_epochs",
            "finetune_rm_batch_size",
            "finetune_rm_optimizer",
            "finetune_rm_heads",
            "finetune_rm_disagreement_penalty",
            "finetune_heldout_fraction",
            "finetune_text_encoder",
        )
    }
    return _finite(
        {
            "benchmark": "reward_model_fit",
            "question": QUESTION,
            "machine": machine(),
            "config": {
                **asdict(config),
                "sizes": sizes,
                "generator": str(generator_dir),
                "bootstrap": str(bootstrap_dir),
                "settings": settings_used,
                "fits": {fit: FIT_LABELS[fit] for fit in FITS},
            },
            "data": {
                "pool_pairs": len(pool.pairs),
                "test_pairs": len(test.pairs),
                "pool_votes": dict(pool.votes),
                "test_votes": dict(test.votes),
                "pool_prompts": len(set(pool.prompts)),
                "test_prompts": len(set(test.prompts)),
                "shared_prompts": len(set(pool.prompts) & set(test.prompts)),
                "seconds": round(data_s, 1),
            },
            "baselines": baselines,
            "rows": rows,
            "summary": summarize(rows, sizes),
            "note": (
                "test accuracy: pairwise accuracy on the decided test pairs (held-out listeners, test-split prompts); "
                "decision accuracy: what the cycle decides on (probe: 5-fold cross-validated; finetune: held-out "
                "fifth); passes: decision accuracy > 0.5; wrong refusal: refused though test accuracy > 0.5"
            ),
        }
    )


# --------------------------------------------------------------------------- reports


def table_rows(results: dict[str, Any]) -> list[list[str]]:
    """Rows of the printed table: pairs, fit, test accuracy, decision accuracy, passes, wrong refusals, s/fit."""

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    lines = []
    for point in results["summary"]:
        n = point["draws"]
        if not n:
            lines.append([str(point["size"]), FIT_LABELS[point["fit"]], "skipped", "-", "-", "-", "-"])
            continue
        lines.append(
            [
                str(point["size"]),
                FIT_LABELS[point["fit"]],
                f"{pct(point['test_accuracy_mean'])} ± {pct(point['test_accuracy_std'])}",
                f"{pct(point['decision_accuracy_mean'])} (min {pct(point['decision_accuracy_min'])})",
                f"{round(point['pass_rate'] * n)}/{n}",
                f"{round(point['wrong_refusal_rate'] * n)}/{n}",
                "-" if point["seconds_mean"] is None else f"{point['seconds_mean']:.1f}",
            ]
        )
    return lines


TABLE_COLUMNS = ("pairs", "fit", "test accuracy", "decision accuracy", "passes", "wrong refusals", "s/fit")


def plot_results(results: dict[str, Any], path: Path) -> Path:
    """Test accuracy by fit and size (mean and std over draws, with the cycle's pass count), the oracle,
    bootstrap and chance lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = results["config"]["sizes"]
    baselines = results["baselines"]
    offset = 0.6 / len(FITS)
    fig, ax = plt.subplots(figsize=(6.8, 4.4))
    lowest, highest = 0.45, max(0.7, baselines.get("oracle_mean_listener") or 0.0)
    if baselines.get("oracle_mean_listener") is not None:
        ax.axhline(
            baselines["oracle_mean_listener"],
            color="green",
            linestyle=":",
            label=f"oracle (mean listener) {baselines['oracle_mean_listener']:.3f}",
        )
    if baselines.get("bootstrap_as_is") is not None:
        ax.axhline(
            baselines["bootstrap_as_is"],
            color="grey",
            linestyle="--",
            label=f"bootstrap model as is {baselines['bootstrap_as_is']:.3f}",
        )
        lowest = min(lowest, baselines["bootstrap_as_is"])
    ax.axhline(0.5, color="black", linewidth=0.8, label="chance")
    for k, fit in enumerate(FITS):
        points = [next(p for p in results["summary"] if p["size"] == size and p["fit"] == fit) for size in sizes]
        xs = np.arange(len(sizes)) + (k - (len(FITS) - 1) / 2) * offset
        means = np.array([np.nan if p["test_accuracy_mean"] is None else p["test_accuracy_mean"] for p in points])
        stds = np.array([p["test_accuracy_std"] or 0.0 for p in points])
        ax.errorbar(xs, means, yerr=stds, fmt="o", capsize=4, markersize=6, label=FIT_LABELS[fit])
        for x, mean, std, p in zip(xs, means, stds, points):
            if p["draws"] and np.isfinite(mean):
                ax.annotate(
                    f"{round(p['pass_rate'] * p['draws'])}/{p['draws']} pass",
                    (x, mean - std - 0.006),
                    ha="center",
                    va="top",
                    fontsize=6,
                )
                lowest, highest = min(lowest, mean - std), max(highest, mean + std)
    ax.set_xticks(range(len(sizes)))
    ax.set_xticklabels([f"{size} training pairs" for size in sizes])
    ax.set_xlim(-0.5, len(sizes) - 0.5)
    ax.set_ylim(math.floor((lowest - 0.04) * 20) / 20, math.ceil((highest + 0.1) * 20) / 20)
    ax.set_ylabel("accuracy on the test pairs (held-out listeners)")
    draws, data = results["config"]["draws"], results["data"]
    ax.set_title(
        f"Reward-model fits: {draws} draw{'s' if draws != 1 else ''} per size, {data['test_pairs']} test pairs",
        fontsize=10,
    )
    ax.legend(loc="upper center", ncol=2, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_results(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """``reward_model_fit.json`` and ``reward_model_fit.png`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out_dir / "reward_model_fit.json", out_dir / "reward_model_fit.png"
    json_path.write_text(json.dumps(_finite(results), indent=2, allow_nan=False) + "\n")
    plot_results(results, png_path)
    return [json_path, png_path]
