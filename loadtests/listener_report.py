"""Calibration report of a listener population on the project's own music.

``calibrate`` renders procedural corpus music (``musicrl.corpus`` composed, decoded by
``musicrl.audio.codec``), lets the population listen, and measures what
docs/listeners.md promises: agreement between two listeners, how often they abstain
or call a tie, how long they listen, and how far choosing among one prompt's clips by
the population's taste moves the held-out listeners' win rate.
"""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
from tqdm import tqdm

from musicrl.listeners import ListenerConfig, Population, expected_agreement, hear


def corpus_clip(attributes, seconds: float, seed: int) -> np.ndarray:
    from musicrl.audio import codec
    from musicrl.corpus.composer import compose

    tokens, _ = compose(attributes, codec.frames_for(seconds), random.Random(seed))
    return codec.decode(np.asarray(tokens))


def calibrate(
    config: ListenerConfig, seed: int = 0, n_clips: int = 60, n_votes: int = 400, n_prompts: int = 8,
    seconds: float = 5.0, progress: bool = True,
) -> dict:  # fmt: skip
    from musicrl.corpus.attributes import sample_attributes

    population = Population(config, seed)
    rng = np.random.default_rng(seed)
    attribute_rng = random.Random(seed)
    clips = [
        corpus_clip(sample_attributes(attribute_rng), seconds, seed * 100_000 + index)
        for index in tqdm(range(n_clips), desc="composing clips", disable=not progress)
    ]
    features = [hear(clip) for clip in clips]

    votes = []
    for _ in tqdm(range(n_votes), desc="votes", disable=not progress):
        i, j = rng.choice(n_clips, size=2, replace=False)
        votes.append(population.sample(rng).judge(clips[i], clips[j], rng))
    choices = Counter(vote.choice for vote in votes)
    cast = sum(choices[c] for c in ("a", "b", "tie"))

    mean, judges = population.mean_listener(), population.held_out()
    best_of_8 = []
    for prompt in tqdm(range(n_prompts), desc="best of 8 per prompt", disable=not progress):
        attributes = sample_attributes(attribute_rng)
        heard = [hear(corpus_clip(attributes, seconds, seed * 100_000 + 50_000 + prompt * 16 + k)) for k in range(16)]
        best = max(heard[:8], key=mean.utility_of)
        for other in heard[8:]:
            outcomes = [j.outcome_probabilities(j.utility_of(best), j.utility_of(other)) for j in judges]
            best_of_8.append(float(np.mean([p["a"] / (p["a"] + p["b"]) for p in outcomes])))

    return {
        "config": config.model_dump(mode="json"),
        "seed": seed,
        "clips": n_clips,
        "clip_seconds": seconds,
        "agreement": round(expected_agreement(population, features, 4000, rng), 4),
        "votes": n_votes,
        "choices": dict(choices),
        "no_vote_rate": round(choices["none"] / n_votes, 4),
        "tie_rate_of_votes": round(choices["tie"] / cast, 4) if cast else None,
        "mean_listen_share": round(float(np.mean([(v.listen_a_s + v.listen_b_s) / (2 * seconds) for v in votes])), 4),
        "heldout_win_rate_best_of_8": round(float(np.mean(best_of_8)), 4),
        "mean_utility_std": round(float(np.std([mean.utility_of(f) for f in features])), 4),
    }
