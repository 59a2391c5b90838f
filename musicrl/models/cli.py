import typer

app = typer.Typer(no_args_is_help=True)


# ---------------------------------------------------------------- generator and preference model


# The help is given here, not as a docstring: a docstring wrapped at 120 columns would wrap the command list too.
@app.command(
    "train-generator",
    help=(
        "Pretrain the generator on the procedural corpus "
        "(next-token cross-entropy, plus counterfactual captions if asked)."
    ),
)
def train_generator_command(
    steps: int = typer.Option(500, help="Optimiser steps (batch of 16 clips of 30 s each)."),
    n_train: int = typer.Option(3000, help="Training corpus clips (each with 2 caption phrasings)."),
    out_dir: str = typer.Option("checkpoints/generator", help="Where the final checkpoint is written."),
    work_dir: str = typer.Option(".data/train/generator", help="Resumable training state and caption-embedding cache."),
    d_model: int = typer.Option(256),
    n_layers: int = typer.Option(4),
    batch_size: int = typer.Option(16, help="Whole clips per step."),
    start_batch_size: int = typer.Option(0, help="Clip openings per step (a conditioning-focused stage)."),
    start_frames: int = typer.Option(40, help="Length of a clip opening in frames."),
    counterfactual_batch_size: int = typer.Option(
        0, help="Clip openings per step also scored under counterfactual captions (mode, tempo changed)."
    ),
    counterfactual_frames: int = typer.Option(80, help="Length of a counterfactual opening in frames."),
    counterfactual_weight: float = typer.Option(1.0, help="Weight of the counterfactual loss."),
    attribute_head: str = typer.Option(
        "",
        help=(
            "Comma-separated caption attributes for the attribute head "
            "(of key, mode, tempo, tonic, bpm; bpm adds the beat clock); empty: none."
        ),
    ),
    attribute_weight: float = typer.Option(1.0, help="Weight of the attribute head's auxiliary loss."),
    min_learning_rate: float = typer.Option(1e-4, help="End of the cosine decay."),
    learning_rate: float = typer.Option(1e-3),
    warmup_steps: int = typer.Option(40),
    init_from: str = typer.Option(
        "", help="Generator checkpoint to start from (second stage) instead of random weights."
    ),
    seed: int = typer.Option(0),
    threads: int = typer.Option(1, help="Torch intra-op threads."),
    resume: bool = typer.Option(True, help="Continue from the state in --work-dir when there is one."),
) -> None:
    import json
    import shlex
    import sys
    from dataclasses import replace
    from pathlib import Path

    from musicrl.corpus.attributes import BPM_BIN_CENTRES, LABELLED_ATTRIBUTES
    from musicrl.models.train_generator import GeneratorTrainingConfig, default_model_config, train_generator

    names = tuple(name.strip() for name in attribute_head.split(",") if name.strip())
    unknown = set(names) - set(LABELLED_ATTRIBUTES)
    if unknown:
        raise typer.BadParameter(
            f"unknown attributes {sorted(unknown)}; choose from {sorted(LABELLED_ATTRIBUTES)}",
            param_hint="--attribute-head",
        )
    model = replace(
        default_model_config(),
        d_model=d_model,
        n_layers=n_layers,
        attribute_names=names,
        attribute_sizes=tuple(len(LABELLED_ATTRIBUTES[name]) for name in names),
        bpm_bins=BPM_BIN_CENTRES if "bpm" in names else (),
    )
    config = GeneratorTrainingConfig(
        out_dir=Path(out_dir),
        work_dir=Path(work_dir),
        model=model,
        n_train=n_train,
        steps=steps,
        seed=seed,
        batch_size=batch_size,
        start_batch_size=start_batch_size,
        start_frames=start_frames,
        learning_rate=learning_rate,
        counterfactual_batch_size=counterfactual_batch_size,
        counterfactual_frames=counterfactual_frames,
        counterfactual_weight=counterfactual_weight,
        min_learning_rate=min_learning_rate,
        threads=threads,
        attribute_weight=attribute_weight,
        command=shlex.join(["musicrl", *sys.argv[1:]]),
        warmup_steps=warmup_steps,
        init_from=Path(init_from) if init_from else None,
    )
    typer.echo(json.dumps(train_generator(config, resume=resume), indent=2))


@app.command("generate")
def generate_command(
    prompt: str = typer.Argument(..., help="Caption of the music to generate."),
    out: str = typer.Option("generated.wav", help="WAV file to write (candidates get _0, _1, ... suffixes)."),
    duration_s: float = typer.Option(10.0),
    temperature: float = typer.Option(0.99),
    top_k: int = typer.Option(0),
    seed: int = typer.Option(0),
    candidates: int = typer.Option(1),
    checkpoint: str = typer.Option("checkpoints/generator"),
) -> None:
    """Generate clips for a prompt with a generator checkpoint and write them as WAV files."""
    from pathlib import Path

    from musicrl.audio.formats import encode_audio
    from musicrl.device import set_inference_threads
    from musicrl.models.generator import generate, load_generator
    from musicrl.text import load_text_encoder

    set_inference_threads(1)
    model, meta = load_generator(checkpoint)
    result = generate(
        model,
        load_text_encoder(model.config.text_encoder),
        [prompt] * candidates,
        duration_s,
        temperature,
        top_k,
        [seed + i for i in range(candidates)],
    )
    target = Path(out)
    for i, wave in enumerate(result.audio):
        path = target if candidates == 1 else target.with_name(f"{target.stem}_{i}{target.suffix}")
        path.write_bytes(encode_audio(wave, result.sample_rate, "wav"))
        typer.echo(
            f"{path}  mean log-prob/token {result.logprobs[i].mean():.3f}  policy version {meta.get('version', '?')}"
        )


# ---------------------------------------------------------------- corpus, text-adherence and quality models


@app.command("corpus")
def corpus_command(
    n: int = typer.Option(10, help="Records to write."),
    split: str = typer.Option("train", help="train | valid | test (disjoint attribute sets)."),
    seed: int = typer.Option(0),
    duration_s: float = typer.Option(10.0),
    out: str = typer.Option("-", help="JSONL file, '-' for stdout."),
    audio_dir: str = typer.Option("", help="Also render each record to <audio_dir>/<split>-<index>.wav."),
) -> None:
    """Write procedural corpus records (caption, attributes, tokens) as JSON lines."""
    import json
    import sys
    from pathlib import Path

    from musicrl.audio.codec import SAMPLE_RATE
    from musicrl.audio.formats import encode_audio
    from musicrl.corpus import make_corpus

    stream = sys.stdout if out == "-" else open(out, "w")  # noqa: SIM115 - closed below
    for record in make_corpus(n, seed=seed, split=split, duration_s=duration_s):
        stream.write(json.dumps(record.to_dict()) + "\n")
        if audio_dir:
            Path(audio_dir).mkdir(parents=True, exist_ok=True)
            (Path(audio_dir) / f"{split}-{record.index}.wav").write_bytes(encode_audio(record.render(), SAMPLE_RATE))
    if stream is not sys.stdout:
        stream.close()


@app.command("train-text-adherence")
def train_text_adherence_command(
    steps: int = typer.Option(800),
    n_train: int = typer.Option(3000, help="Training clips (10 s), each with --n-captions phrasings."),
    n_captions: int = typer.Option(3),
    batch_size: int = typer.Option(128),
    seed: int = typer.Option(0),
    threads: int = typer.Option(1, help="torch intra-op threads (the CPU is shared)."),
    out_dir: str = typer.Option("checkpoints/text_adherence"),
    work_dir: str = typer.Option(".data/train/audio", help="Resumable training state."),
    cache_dir: str = typer.Option(".data/audio_cache", help="Rendered log-mels and caption embeddings."),
) -> None:
    """Train the audio encoder contrastively against frozen MiniLM caption embeddings; export ONNX."""
    import json

    from musicrl.models.train_audio import ContrastiveTrainer, TextAdherenceTrainingConfig

    config = TextAdherenceTrainingConfig(
        steps=steps, n_train=n_train, n_captions=n_captions, batch_size=batch_size, seed=seed, threads=threads
    )
    trainer = ContrastiveTrainer(config, work_dir, out_dir, cache_dir)
    metrics = trainer.train()
    command = (
        f"musicrl models train-text-adherence --steps {steps} --n-train {n_train} --n-captions {n_captions} "
        f"--batch-size {batch_size} --seed {seed}"
    )
    typer.echo(f"wrote {trainer.save(metrics, command)}")
    typer.echo(json.dumps(metrics, indent=2))


@app.command("train-quality")
def train_quality_command(
    steps: int = typer.Option(2000),
    n_train: int = typer.Option(1500, help="Training clips, each rendered --renders times with random degradations."),
    renders: int = typer.Option(2),
    batch_size: int = typer.Option(64),
    seed: int = typer.Option(0),
    threads: int = typer.Option(1, help="torch intra-op threads (the CPU is shared)."),
    out_dir: str = typer.Option("checkpoints/quality"),
    work_dir: str = typer.Option(".data/train/audio", help="Resumable training state."),
    cache_dir: str = typer.Option(".data/audio_cache", help="Rendered degraded log-mels."),
) -> None:
    """Train the MOS regressor on clean and degraded renders; export ONNX."""
    import json

    from musicrl.models.train_audio import MosTrainer, QualityTrainingConfig

    config = QualityTrainingConfig(
        steps=steps, n_train=n_train, renders_per_record=renders, batch_size=batch_size, seed=seed, threads=threads
    )
    trainer = MosTrainer(config, work_dir, out_dir, cache_dir)
    metrics = trainer.train()
    command = (
        f"musicrl models train-quality --steps {steps} --n-train {n_train} --renders {renders} "
        f"--batch-size {batch_size} --seed {seed}"
    )
    typer.echo(f"wrote {trainer.save(metrics, command)}")
    typer.echo(json.dumps(metrics, indent=2))


@app.command("eval-rewards")
def eval_rewards_command(
    checkpoints: str = typer.Option("checkpoints", help="Directory with text_adherence/ and quality/."),
    results: str = typer.Option(
        "results/models.json", help="Results file; only the keys codec, text_adherence, quality are replaced."
    ),
    n_retrieval: int = typer.Option(200, help="Held-out clips in the caption-retrieval pool."),
    n_quality: int = typer.Option(480, help="Held-out degraded clips for the quality correlation."),
    n_codec: int = typer.Option(20, help="Held-out clips for codec speed and round trip."),
    seed: int = typer.Option(0),
) -> None:
    """Evaluate the codec, text-adherence and quality models on held-out data; write results and plots."""
    import json
    from pathlib import Path

    from musicrl.models.eval_audio import evaluate

    typer.echo(json.dumps(evaluate(Path(checkpoints), Path(results), n_retrieval, n_quality, n_codec, seed), indent=2))


@app.command("evaluate-generator")
def evaluate_generator_command(
    checkpoint: str = typer.Option("checkpoints/generator"),
    results: str = typer.Option("results/models.json", help="Merged: keys 'generator' and 'attribute_recovery'."),
    plot: str = typer.Option("results/generator_attribute_recovery.png"),
    n_prompts: int = typer.Option(
        400, help="Held-out corpus captions to generate from (single-instrument ones are kept)."
    ),
    seed: int = typer.Option(0),
) -> None:
    """Attribute recovery from generated audio and real-time factors; writes results/models.json and a PNG."""
    import json
    from pathlib import Path

    from musicrl.models.evaluate import GeneratorEvaluationConfig, evaluate_generator

    config = GeneratorEvaluationConfig(
        checkpoint=Path(checkpoint), results=Path(results), plot=Path(plot), n_prompts=n_prompts, seed=seed
    )
    summary = evaluate_generator(config)
    recovery = summary["attribute_recovery"]["targets"]
    typer.echo(
        json.dumps(
            {
                t: {
                    k: v[k]
                    for k in (
                        "generated_accuracy",
                        "generated_accuracy_shuffled_prompts",
                        "probe_accuracy_on_heldout_corpus",
                    )
                }
                | {"chance": v["chance"]["majority"]}
                for t, v in recovery.items()
            },
            indent=2,
        )
    )
    typer.echo(json.dumps(summary["generator"]["real_time_factor"], indent=2))


@app.command("train-preference")
def train_preference_command(
    generator: str = typer.Option("checkpoints/generator", help="Generator checkpoint the reward model starts from."),
    out_dir: str = typer.Option("checkpoints/preference"),
    n_train: int = typer.Option(480, help="Bootstrap training pairs (half caption mismatch, half glitched copy)."),
    n_heldout: int = typer.Option(120),
    epochs: int = typer.Option(2),
    learning_rate: float = typer.Option(3e-4),
    seed: int = typer.Option(0),
) -> None:
    """Train the default (bootstrap) Bradley-Terry preference model, initialised from the generator; export ONNX."""
    import json
    from pathlib import Path

    from musicrl.models.preference import PreferenceTrainingConfig
    from musicrl.models.train_preference import BootstrapPreferenceConfig, train_bootstrap_preference

    training = PreferenceTrainingConfig(learning_rate=learning_rate, epochs=epochs, seed=seed)
    config = BootstrapPreferenceConfig(
        generator=Path(generator),
        out_dir=Path(out_dir),
        n_train=n_train,
        n_heldout=n_heldout,
        corpus_seed=seed,
        training=training,
    )
    typer.echo(json.dumps(train_bootstrap_preference(config), indent=2))
