"""One finetuning cycle, resumable at every stage.

    prepare  -> buffer window, reward model (U, RU), prompts, training job      status "training"
    train    -> job in-process or under torchrun, checkpoints every few steps   status "trained"
                (U, RU: no preference model trained on users' votes yet: status "skipped", no RL)
    gate     -> snapshots vs parent on held-out prompts, the best passing one   status "published" | "rejected"
    publish  -> registry version with metrics and lineage
    deploy   -> verify, install into Triton, load, move the pointer             status "deployed"  | "deploy_failed"
    (canary) -> with finetune_promotion canary|both, instead of deploy:         status "canary" -> "deployed"
                served as the challenger, users' votes on mixed pairs             | "rolled_back" | "inconclusive"
                decide (finetune_worker.canary)

The state of the run in progress is ``<work_dir>/run/run.json``, rewritten
atomically after every stage. A worker killed at any point restarts the same
run at the stage it was in: training resumes from its last checkpoint, a
publish that landed before the kill is found again by its ``run_id`` (so
nothing is published twice), and a model is published only from the directory
the training job renames into place when it has finished every step.
Finished runs are moved to ``<work_dir>/runs/<run_id>``.

SIGTERM/SIGINT (``finetune_worker.shutdown``) stop a cycle at the next safe point: before a
stage, between training steps (checkpointed first), between the gate's snapshots. Publish and
deploy are never cut short: a signal during them takes effect once they are done.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, Field

from finetune_worker import shutdown
from finetune_worker.canary import best_finite, canary_enabled, gate_enforced, run_canary_stage
from finetune_worker.configs import gate_config, trainer_config
from finetune_worker.deploy import CheckpointRejected, Deployer, DeployError
from finetune_worker.evaluation import evaluate_policy
from finetune_worker.gate import choose, evaluate_gate, refusal_reason, weights_finite
from finetune_worker.plots import plot_training
from finetune_worker.prompts import split_prompts
from finetune_worker.reward_model import (
    HELDOUT_FRACTION_KEY,
    load_warm_start,
    pairs_from_rows,
    reward_model_from_settings,
    rows_of_codebooks,
    select_pair_rows,
)
from finetune_worker.rewards import for_policy, make_reward_fn
from finetune_worker.settings import FinetuneSettings
from finetune_worker.train import HISTORY_FILE, TrainJob, make_embed, run_job
from finetune_worker.trainers.reinforce import STAGE_WEIGHTS
from musicrl.audio import codec
from musicrl.buffer import PreferenceBuffer, PreferenceRow, rows_to_parquet, usable_pair
from musicrl.checkpoint import write_atomic
from musicrl.device import resolve_device
from musicrl.logging import get_logger
from musicrl.models.policy import GeneratorPolicy, Policy, load_policy, policy_kind
from musicrl.registry import Registry
from musicrl.storage import ObjectStore

log = get_logger(__name__)

GENERATOR = "generator"
PREFERENCE = "reward/preference"
# The preference model of a MusicGen policy (musicrl.models.preference_musicgen): a registry kind of its own, because
# the reward service loads reward/preference as a token model over the default codec; the worker scores it itself.
PREFERENCE_MUSICGEN = "reward/preference-musicgen"
TERMINAL = ("deployed", "rejected", "deploy_failed", "skipped", "rolled_back", "inconclusive")


class RunState(BaseModel):
    run_id: str
    status: str = "training"
    created_at: str
    stage: str
    trainer: str
    parent_version: str
    reference_version: str
    reward_versions: dict[str, str] = Field(default_factory=dict)
    reward_model: dict[str, Any] = Field(default_factory=dict)
    buffer_segments: list[str] = Field(default_factory=list)
    n_preferences: int = 0
    eval_prompts: list[str] = Field(default_factory=list)
    train_history_last: dict[str, float] = Field(default_factory=dict)
    resumed_from_step: int | None = None
    gate: dict[str, Any] = Field(default_factory=dict)
    candidate_version: str | None = None
    deploy: dict[str, Any] = Field(default_factory=dict)
    canary: dict[str, Any] = Field(
        default_factory=dict
    )  # the canary record (finetune_worker.canary), without its vote ids
    reason: str | None = None
    timings_s: dict[str, float] = Field(default_factory=dict)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def code_commit() -> str:
    if os.environ.get("MUSICRL_CODE_COMMIT"):
        return os.environ["MUSICRL_CODE_COMMIT"]
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class FinetuneCycle:
    def __init__(self, settings: FinetuneSettings, store: ObjectStore | None = None, reward_fn=None):
        self.settings = settings
        self.store = store or ObjectStore(settings)
        self.registry = Registry(self.store)
        self.buffer = PreferenceBuffer(self.store)
        self.work_dir = Path(settings.finetune_work_dir).resolve()
        self.run_dir = self.work_dir / "run"
        token = settings.finetune_reward_admin_token
        self._reward_spec = settings.finetune_reward or settings.reward_url
        self.reward_fn = reward_fn or make_reward_fn(self._reward_spec, token.get_secret_value() if token else None)
        self._embed = None
        # Called before every write others can see (publish, deploy); the loop sets it to the lease's
        # renew(), which raises LeaseLost if another worker took over, so a stale worker stops there.
        self.guard: Callable[[], None] = lambda: None
        if settings.finetune_torch_threads:
            torch.set_num_threads(settings.finetune_torch_threads)

    # ------------------------------------------------------------------ state

    @property
    def state_path(self) -> Path:
        return self.run_dir / "run.json"

    def load_state(self) -> RunState | None:
        if not self.state_path.is_file():
            return None
        return RunState.model_validate_json(self.state_path.read_text())

    def save_state(self, state: RunState) -> None:
        write_atomic(self.state_path, state.model_dump_json(indent=2))

    @property
    def embed(self):
        if self._embed is None:
            self._embed = make_embed(self.settings.finetune_text_encoder)
        return self._embed

    # ------------------------------------------------------------------ the cycle

    def run_once(self) -> dict[str, Any]:
        """Run (or resume) one cycle to a terminal status; returns the run's record."""
        state = self.load_state()
        if state is None or state.status in TERMINAL:
            shutdown.check("before a new cycle")
            state = self.prepare()
        else:
            log.info("cycle.resume", run_id=state.run_id, status=state.status)
        try:
            # A stop request ends the cycle only here, between stages (and inside train and gate at their
            # own safe points): the state is saved, and the next start resumes at this stage.
            if state.status == "training":
                shutdown.check(f"before training run {state.run_id}")
                self._timed(state, "train", self.train, state)
            if state.status == "trained":
                shutdown.check(f"before gating run {state.run_id}")
                self._timed(state, "gate", self.gate_and_publish, state)
            if state.status in ("published", "canary") and self.settings.finetune_auto_deploy:
                shutdown.check(f"before deploying run {state.run_id}")
                # Served as the challenger; users' votes promote or roll it back. A canary already started goes on
                # even if the setting changed since (its challenger is serving and its record says running).
                if canary_enabled(self.settings) or state.status == "canary":
                    self._timed(state, "canary", run_canary_stage, self, state)
                else:
                    self._timed(state, "deploy", self.deploy, state)
        finally:
            self.save_state(state)
        return self.finish(state)

    def _timed(self, state: RunState, name: str, fn, *args) -> None:
        started = time.perf_counter()
        fn(*args)
        state.timings_s[name] = round(time.perf_counter() - started, 3)
        self.save_state(state)

    # ------------------------------------------------------------------ prepare

    def prepare(self) -> RunState:
        s = self.settings
        started = time.perf_counter()
        parent = self.registry.current(GENERATOR)
        if parent is None:
            raise RuntimeError(
                "no current generator in the registry: publish one first "
                "(`musicrl stack up` publishes checkpoints/generator as version 1)"
            )
        reference = self.reference_version(parent)
        shutil.rmtree(self.run_dir, ignore_errors=True)
        self.run_dir.mkdir(parents=True)
        self.registry.download(GENERATOR, parent, self.run_dir / "parent")
        self.registry.download(GENERATOR, reference, self.run_dir / "reference")

        window = self.buffer.policy_versions()[-s.finetune_recent_policies :]
        segments = self.buffer.segments(window)
        rows = self.buffer.read(last_policies=s.finetune_recent_policies).to_pylist() if segments else []
        state = RunState(
            run_id=uuid.uuid4().hex[:12],
            created_at=_now(),
            stage=s.finetune_stage,
            trainer=s.finetune_trainer,
            parent_version=parent,
            reference_version=reference,
            n_preferences=len(rows),
            buffer_segments=[r.key for r in segments],
        )
        if s.finetune_stage in ("U", "RU") and s.finetune_train_reward_model:
            shutdown.check("before training the reward model")  # nothing of this run is saved yet: it starts over
            state.reward_model = self.update_reward_model(rows, state)
            if self.vote_trained_preference(self.preference_kind()) is None:
                # The committed bootstrap model encodes priors, not these users: optimising it moved one closed-loop
                # run's policy to a 36 % win rate against the base. Wait for a model that passed its held-out check.
                state.status = "skipped"
                state.reason = (
                    "no preference model trained on users' votes has passed its held-out check yet; nothing to optimise"
                )
                self.save_state(state)
                log.info("cycle.skipped", run_id=state.run_id, reason=state.reason)
                return state
        preference_dir, preference_version = self.policy_preference(state)
        state.reward_versions = dict(
            getattr(self.policy_reward_fn((preference_dir, preference_version)), "versions", {}) or {}
        )

        user_train, user_heldout = split_prompts([r["prompt"] for r in rows], s.finetune_heldout_fraction)
        captions = self.corpus_captions("train", s.finetune_corpus_captions)
        eval_prompts = (user_heldout + self.corpus_captions("valid", s.finetune_eval_prompts))[
            : s.finetune_eval_prompts
        ]
        state.eval_prompts = eval_prompts
        job = TrainJob(
            trainer=s.finetune_trainer,
            policy_dir=self.run_dir / "parent",
            output_dir=self.run_dir / "candidate",
            checkpoint_dir=self.run_dir / "checkpoints",
            candidates_dir=self.run_dir / "candidates",
            config=trainer_config(s, self.parent_policy().frames_for),
            user_prompts=user_train,
            captions=captions,
            user_fraction=s.finetune_user_prompt_fraction,
            pairs_file=self.write_dpo_pairs(rows, parent) if s.finetune_trainer == "dpo" else None,
            reward=self._reward_spec,
            text_encoder=s.finetune_text_encoder,
            preference_dir=preference_dir,
            preference_version=preference_version,
            meta={"run_id": state.run_id, "parent_version": parent, "stage": s.finetune_stage},
        )
        job.write(self.run_dir / "job.json")
        state.timings_s["prepare"] = round(time.perf_counter() - started, 3)
        self.save_state(state)
        log.info("cycle.prepared", run_id=state.run_id, parent=parent, reference=reference, preferences=len(rows))
        return state

    def vote_trained_preference(self, kind: str = PREFERENCE) -> str | None:
        """The current preference model if a cycle trained it on users' votes (its lineage names the run), else None."""
        version = self.registry.current(kind)
        if version is None:
            return None
        return version if self.registry.manifest(kind, version).get("lineage", {}).get("run_id") else None

    # ------------------------------------------------------------------ the parent's kind (musicrl.models.policy)

    def parent_policy(self) -> Policy:
        """The run's parent policy (``run/parent``), loaded once per cycle object (the default kind with its
        text encoder)."""
        directory = self.run_dir / "parent"
        cached = getattr(self, "_parent", None)
        if cached is None or cached[0] != directory.stat().st_mtime_ns:
            kind = policy_kind(directory)
            embed = (
                (lambda prompts: self.embed(prompts)) if kind == "default" else None
            )  # the text encoder loads on first use
            policy = load_policy(directory, resolve_device(self.settings.finetune_device), embed)
            cached = self._parent = (directory.stat().st_mtime_ns, policy)
        return cached[1]

    def preference_kind(self) -> str:
        """The registry kind of the parent's preference model: ``reward/preference`` for the default generator."""
        return PREFERENCE if policy_kind(self.run_dir / "parent") == "default" else PREFERENCE_MUSICGEN

    def policy_preference(self, state: RunState) -> tuple[Path | None, str | None]:
        """(directory, version) of the current vote-trained preference model of a MusicGen parent, downloaded into the
        run; (None, None) for the default generator (the reward service serves its model) or when there is none yet."""
        kind = self.preference_kind()
        version = self.vote_trained_preference(kind) if kind != PREFERENCE and state.stage in ("U", "RU") else None
        if version is None:
            return None, None
        return self.registry.download(kind, version, self.run_dir / "preference"), version

    def policy_reward_fn(self, preference: tuple[Path | None, str | None] | None = None):
        """The reward function for the parent's kind: ``reward_fn`` itself for the default generator; for MusicGen, the
        decoded audio to it and the preference from the run's preference model (``finetune_worker.rewards.for_policy``):
        ``preference`` (directory, version) as ``policy_preference`` gave it, else the run's job says it."""
        if policy_kind(self.run_dir / "parent") == "default":
            return self.reward_fn
        if preference is None:
            job = TrainJob.model_validate_json((self.run_dir / "job.json").read_text())
            preference = (job.preference_dir, job.preference_version)
        return for_policy(self.reward_fn, self.parent_policy(), *preference)

    def reference_version(self, parent: str) -> str:
        """The policy the KL is taken against: configured; else the R policy for RU; else the base (first) version."""
        s = self.settings
        if s.finetune_reference_version:
            return s.finetune_reference_version
        versions = self.registry.versions(GENERATOR)
        if s.finetune_stage == "RU":
            r_policies = [
                v for v in versions if self.registry.manifest(GENERATOR, v).get("lineage", {}).get("stage") == "R"
            ]
            if not r_policies:
                raise RuntimeError(
                    "stage RU takes the KL against an R policy, and none is published: run stage R first"
                )
            return r_policies[-1]
        return versions[0] if versions else parent

    def corpus_captions(self, split: str, n: int) -> list[str]:
        from musicrl.corpus.dataset import make_corpus  # noqa: PLC0415 - composes music we do not need; captions only

        return [r.caption for r in make_corpus(n, seed=self.settings.finetune_seed, split=split, duration_s=1.0)]

    def write_dpo_pairs(self, rows: list[PreferenceRow], parent: str) -> Path:
        """The buffer rows DPO trains on (sampled by ``parent`` alone, decided by a user who heard both clips), as
        Parquet with the buffer's own schema (``musicrl.buffer.rows_to_parquet``): the job reads them with
        ``pairs_from_buffer``, nothing pickled."""
        import pyarrow as pa  # noqa: PLC0415

        from finetune_worker.trainers.dpo import pairs_from_buffer  # noqa: PLC0415

        on_policy = [
            r
            for r in rows
            if r["policy_version"] == parent
            and not r.get("mixed_policy")
            and usable_pair(r, self.settings.min_listen_fraction, ties=False)
        ]
        if not on_policy or not pairs_from_buffer(pa.Table.from_pylist(on_policy)):
            raise RuntimeError(
                f"DPO needs non-tie preference pairs sampled by the current policy {parent}; the buffer has none"
            )
        path = self.run_dir / "dpo_rows.parquet"
        path.write_bytes(rows_to_parquet(on_policy))
        return path

    def update_reward_model(self, rows: list[PreferenceRow], state: RunState) -> dict[str, Any]:
        """Train, publish and hot-load the preference reward model when the buffer holds enough pairs.

        Warm-started from the current preference model when its architecture is the parent generator's,
        on a bounded replay of the buffer window (every pair of the parent policy, a seeded sample of
        older ones, at most ``finetune_rm_max_pairs``), so a cycle's cost stays flat as the buffer grows.
        """
        s = self.settings
        policy = self.parent_policy()
        default_kind = isinstance(policy, GeneratorPolicy)
        kind = self.preference_kind()
        # A policy's reward model reads its own kind's clips (a buffer window may span a switch of kind).
        rows = rows_of_codebooks(rows, policy.num_codebooks)
        selected = select_pair_rows(
            rows,
            state.parent_version,
            max_pairs=s.finetune_rm_max_pairs,
            heldout_fraction=s.finetune_heldout_fraction,
            seed=s.finetune_seed,
            max_pairs_per_user=s.finetune_max_pairs_per_user or None,
            min_listen_fraction=s.min_listen_fraction,
        )
        embed = self.embed if default_kind else None  # MusicGen's trunk conditions on the prompt with its own T5
        rule = {"num_codebooks": policy.num_codebooks, "min_listen_fraction": s.min_listen_fraction}
        train, heldout = (
            pairs_from_rows(selected.train, embed, **rule),
            pairs_from_rows(selected.heldout, embed, **rule),
        )
        if len(train.pairs) < s.finetune_rm_min_pairs:
            log.info("reward_model.skipped", pairs=len(train.pairs), needed=s.finetune_rm_min_pairs)
            return {"skipped": f"{len(train.pairs)} training pairs < {s.finetune_rm_min_pairs}", **selected.stats}
        generator = policy.generator if default_kind else policy  # the trunk: the default Generator, or MusicGen itself
        out_dir = self.run_dir / "reward_model"
        warm = s.finetune_rm_fit == "finetune" and default_kind
        start, warm_start_from = self._reward_model_warm_start(generator) if warm else (None, None)
        meta = {
            "warm_start_from": warm_start_from,
            HELDOUT_FRACTION_KEY: s.finetune_heldout_fraction,
            "initialised_from": {"kind": PREFERENCE, "version": warm_start_from}
            if warm_start_from
            else {"kind": GENERATOR, "version": state.parent_version},
        }
        reward_fn = (
            self.reward_fn if default_kind else for_policy(self.reward_fn, policy)
        )  # single-reward accuracies on audio
        metrics, config = reward_model_from_settings(
            s, generator, train, heldout, reward_fn, out_dir, start=start, meta=meta
        )
        metrics = {**metrics, **selected.stats, "warm_start_from": warm_start_from}
        log.info(
            "reward_model.cycle",
            fit=config["fit"],
            warm_start_from=warm_start_from,
            heldout_accuracy=metrics["heldout_accuracy"],
            n_train_pairs=metrics["n_train_pairs"],
        )
        lineage = {
            "generator_version": state.parent_version,
            "buffer_segments": state.buffer_segments,
            "run_id": state.run_id,
            "code_commit": code_commit(),
            "warm_start_from": warm_start_from,
            "replay": selected.stats,
            "training_config": {
                **config,
                "max_pairs": s.finetune_rm_max_pairs,
                HELDOUT_FRACTION_KEY: s.finetune_heldout_fraction,
            },
        }
        if warm_start_from and metrics.get("best_epoch") == 0:
            log.info("reward_model.kept", version=warm_start_from, reason="no epoch beat it on the held-out pairs")
            return {**metrics, "published": None, "kept": warm_start_from}
        if (
            metrics.get("best_epoch") == 0
        ):  # fine-tuned from the generator: epoch 0 has random heads, whatever it scored
            self.registry.record_rejection(
                kind, {"reason": "no epoch improved on the untrained heads", "metrics": metrics, "lineage": lineage}
            )
            return {**metrics, "published": None}
        if not metrics["heldout_accuracy"] > 0.5:
            self.registry.record_rejection(
                kind,
                {
                    "reason": "out-of-sample (held-out or cross-validated) accuracy not above chance",
                    "metrics": metrics,
                    "lineage": lineage,
                },
            )
            return {**metrics, "published": None}
        self.guard()
        version = self.registry.publish(kind, out_dir, metrics=metrics, lineage=lineage)
        self.registry.set_current(kind, version)
        if kind == PREFERENCE:  # a MusicGen policy's model is scored by the worker itself (policy_preference)
            self.wait_for_reward_version(version)
        return {**metrics, "published": version, "kind": kind}

    def _reward_model_warm_start(self, generator) -> tuple[Any, str | None]:
        """(model, version) of the current preference model to continue training, or (None, None): start from the
        generator."""
        s = self.settings
        # Only a model trained on these users' votes: the committed bootstrap model encodes priors, and
        # continuing from it scored 0.52 on fresh votes where starting from the generator scored 0.56
        # (docs/finetune.md, "Warm start").
        version = self.vote_trained_preference() if s.finetune_rm_warm_start else None
        if version is None:
            return None, None
        try:
            directory = self.registry.download(PREFERENCE, version, self.run_dir / "reward_model_start")
            model, why = load_warm_start(
                directory,
                generator,
                s.finetune_rm_heads,
                s.finetune_rm_disagreement_penalty,
                heldout_fraction=s.finetune_heldout_fraction,
                seed=s.finetune_seed,
            )
        except (RuntimeError, OSError, KeyError, ValueError) as exc:  # corrupt or unreadable: start from the generator
            model, why = None, f"{type(exc).__name__}: {exc}"
        finally:
            shutil.rmtree(self.run_dir / "reward_model_start", ignore_errors=True)
        if model is None:
            log.warning("reward_model.cold_start", current=version, reason=why)
            return None, None
        return model, version

    def wait_for_reward_version(self, version: str, timeout_s: float = 120.0) -> None:
        """Make the reward service serve the new preference model before rollouts are scored with it."""
        reload = getattr(self.reward_fn, "reload", None)
        if reload is None:
            return  # an in-process reward function: nothing to reload
        if self.settings.finetune_reward_admin_token is not None:
            reload()
        deadline = time.monotonic() + timeout_s
        probe = np.full((1, codec.frames_for(1.0)), codec.REST, dtype=np.int64)
        while True:
            self.reward_fn(["probe"], probe)
            if self.reward_fn.versions.get("preference") == version:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the reward service did not load preference model {version} within {timeout_s} s")
            time.sleep(1.0)

    # ------------------------------------------------------------------ train

    def train(self, state: RunState) -> None:
        job = TrainJob.model_validate_json((self.run_dir / "job.json").read_text())
        if not job.output_dir.is_dir():
            checkpoint = job.checkpoint_dir / "trainer_state.pt"
            if checkpoint.is_file():
                state.resumed_from_step = int(
                    torch.load(checkpoint, map_location="cpu", weights_only=False)["global_step"]
                )
                self.save_state(state)
            if self.settings.finetune_nproc > 1:
                self.run_torchrun(self.run_dir / "job.json")
            else:
                run_job(job)
        history = json.loads((job.output_dir / HISTORY_FILE).read_text())
        state.train_history_last = history[-1] if history else {}
        plot_training(history, self.run_dir / "plots", title=f"{state.trainer} stage {state.stage}, run {state.run_id}")
        state.status = "trained"

    def run_torchrun(self, job_path: Path) -> None:
        """Train under torchrun. A stop request is passed on as SIGTERM (torchrun forwards it to every rank,
        which checkpoints and stops before its next step); a pod's SIGTERM reaches only this process."""
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={self.settings.finetune_nproc}",
            "-m",
            "finetune_worker.train",
            str(job_path),
        ]
        # Its own session: signals reach it only through this process (as SIGTERM, once), and a hard
        # interrupt can take down the whole group (torchrun and its ranks).
        process = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
        forwarded = False
        try:
            while process.poll() is None:
                if shutdown.requested() and not forwarded:
                    process.send_signal(signal.SIGTERM)
                    forwarded = True
                try:
                    process.wait(timeout=0.5)
                except subprocess.TimeoutExpired:
                    pass
        except BaseException:
            os.killpg(process.pid, signal.SIGKILL)  # interrupted for good (a second Ctrl-C): no orphaned ranks
            process.wait()
            raise
        if process.returncode != 0 and forwarded:
            shutdown.check("during data-parallel training")  # the ranks checkpointed and stopped
        if process.returncode != 0:
            raise RuntimeError(f"torchrun training exited with {process.returncode}")

    # ------------------------------------------------------------------ gate and publish

    def gate_and_publish(self, state: RunState) -> None:
        """Score the parent and every snapshot of the run on the same held-out prompts and seeds; publish the
        snapshot with the highest target reward among those that pass every check, or refuse the cycle."""
        s = self.settings
        device = resolve_device(s.finetune_device)
        parent = self.parent_policy()
        embed = self.embed if isinstance(parent, GeneratorPolicy) else None  # MusicGen conditions itself (T5)
        reference = load_policy(self.run_dir / "reference", device, embed)
        weights = STAGE_WEIGHTS[state.stage]
        common = dict(
            prompts=state.eval_prompts,
            embed=embed,
            reward_fn=self.policy_reward_fn(),
            weights=weights,
            n_frames=parent.frames_for(s.finetune_duration_s),
            temperature=s.finetune_temperature,
            samples_per_prompt=s.finetune_eval_samples_per_prompt,
            seed=s.finetune_seed + 10_000,
        )
        baseline = evaluate_policy(parent, reference, **common)
        checked = []
        for directory in self.candidate_dirs():
            shutdown.check("between the gate's snapshots")  # nothing published yet: the next start gates again
            candidate = load_policy(directory, device, embed)
            meta = json.loads((directory / "meta.json").read_text()) if (directory / "meta.json").is_file() else {}
            scored = evaluate_policy(candidate, reference, **common)
            report = evaluate_gate(
                scored, baseline, list(weights), gate_config(s), candidate_weights_finite=weights_finite(candidate)
            )
            checked.append((directory, meta.get("step"), report))
        reports = [report for _, _, report in checked]
        index = choose(reports)
        if index is None and not gate_enforced(s):  # canary only: the gate's checks are recorded, users' votes decide
            index = best_finite(reports)
        directory, step, report = checked[-1 if index is None else index]
        state.gate = {
            **report.to_dict(),
            "chosen_step": None if index is None else step,
            "enforced": gate_enforced(s),
            "checkpoints": [
                {
                    "step": st,
                    "passed": r.passed,
                    "reason": r.reason,
                    "reward": r.candidate["reward"],
                    "kl": r.candidate["kl"],
                }
                for _, st, r in checked
            ],
        }
        lineage = {
            "run_id": state.run_id,
            "parent_version": state.parent_version,
            "reference_version": state.reference_version,
            "stage": state.stage,
            "trainer": state.trainer,
            "reward_model_versions": state.reward_versions,
            "buffer_segments": state.buffer_segments,
            "n_preferences": state.n_preferences,
            "chosen_step": step,
            "training_config": json.loads((self.run_dir / "job.json").read_text())["config"],
            "code_commit": code_commit(),
        }
        if index is None:
            state.reason = refusal_reason([st for _, st, _ in checked], reports)
            state.gate["reason"] = state.reason
            self.registry.record_rejection(GENERATOR, {"reason": state.reason, "gate": state.gate, "lineage": lineage})
            state.status = "rejected"
            log.warning("cycle.rejected", run_id=state.run_id, reason=state.reason)
            return
        self.guard()
        shutil.copy2(
            self.run_dir / "candidate" / HISTORY_FILE, directory / HISTORY_FILE
        )  # the whole run, up to the last step
        state.candidate_version = self.find_published(state.run_id) or self.registry.publish(
            GENERATOR,
            directory,
            metrics={
                "gate": {"candidate": report.candidate, "baseline": baseline, "chosen_step": step},
                "train": state.train_history_last,
                "reward_model": state.reward_model,
            },
            lineage=lineage,
        )
        state.status = "published"
        log.info("cycle.published", run_id=state.run_id, version=state.candidate_version, step=step)

    def candidate_dirs(self) -> list[Path]:
        """The run's snapshots in step order (the finished policy is the last of them)."""
        snapshots = sorted((self.run_dir / "candidates").glob("step-*"))
        return snapshots or [self.run_dir / "candidate"]

    def find_published(self, run_id: str) -> str | None:
        for version in reversed(self.registry.versions(GENERATOR)):
            if self.registry.manifest(GENERATOR, version).get("lineage", {}).get("run_id") == run_id:
                return version
        return None

    # ------------------------------------------------------------------ deploy

    def deployer(self) -> Deployer:
        return Deployer.from_settings(self.settings, self.registry)

    def deploy(self, state: RunState) -> None:
        self.guard()
        try:
            state.deploy = self.deployer().deploy(state.candidate_version)
            state.status = "deployed"
        except CheckpointRejected as exc:
            state.status, state.reason = "rejected", f"checkpoint rejected before deploy: {exc}"
            self.registry.record_rejection(
                GENERATOR, {"reason": state.reason, "version": state.candidate_version, "run_id": state.run_id}
            )
        except DeployError as exc:
            state.status, state.reason = "deploy_failed", str(exc)
            self.registry.record_rejection(
                GENERATOR, {"reason": state.reason, "version": state.candidate_version, "run_id": state.run_id}
            )

    # ------------------------------------------------------------------ archive

    def finish(self, state: RunState) -> dict[str, Any]:
        record = state.model_dump()
        if state.status in TERMINAL or (state.status == "published" and not self.settings.finetune_auto_deploy):
            archive = self.work_dir / "runs" / state.run_id
            archive.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(archive, ignore_errors=True)
            for heavy in ("checkpoints", "candidates", "parent", "reference"):
                shutil.rmtree(self.run_dir / heavy, ignore_errors=True)
            shutil.move(str(self.run_dir), archive)
            record["archive"] = str(archive)
        return record
