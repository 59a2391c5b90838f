"""Configuration of the finetune worker: ``MUSICRL_FINETUNE_*`` plus the shared mixins.

Every field is documented in ``docs/finetune.md``. Learning rates default to the
paper's values scaled to the small default generator (see the doc for why).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator

from musicrl.config import ObjectStoreConfig, PreferenceRulesConfig, TritonConfig


class FinetuneSettings(ObjectStoreConfig, TritonConfig, PreferenceRulesConfig):
    reward_url: str = "http://127.0.0.1:8090"
    """Base URL of the reward service that scores rollouts."""
    finetune_reward_admin_token: SecretStr | None = Field(
        None, description="Bearer token of the reward service's reload API."
    )
    finetune_reward: str | None = Field(
        None,
        description=(
            "Reward function instead of the service at reward_url: local:onnx|torch|tiny or python:module:attr."
        ),
    )

    # Where the worker keeps its state: the run in progress, checkpoints, downloads.
    finetune_work_dir: Path = Path(".data/finetune")
    """Worker state: the run in progress, checkpoints, downloads, archive of runs."""
    finetune_results_dir: Path = Path("results")
    """Where reports are written."""
    finetune_triton_repo: str | Path = Field(
        Path(".stack/triton/models"),
        description=(
            "Triton model repository the worker deploys to (must be writable): a local directory, or an object-store "
            "repository `s3://BUCKET/PREFIX` written through the `MUSICRL_S3_*` endpoint (Triton then reads "
            "`s3://http://HOST:PORT/BUCKET/PREFIX`)."
        ),
    )
    finetune_deploy_timeout_s: float = Field(300.0, gt=0)
    """Wait for Triton to load a deployed version, in seconds."""
    finetune_triton_admin_key: SecretStr | None = Field(
        None,
        description=(
            "Sent as the `triton-admin-key` header with load requests, where Triton restricts its model-repository API "
            "(--http-restricted-api; the Kubernetes manifests do)."
        ),
    )
    finetune_auto_deploy: bool = Field(
        True,
        description=(
            "Deploy a published candidate at once; false stops at 'published' (deploy later with rollback VERSION)."
        ),
    )
    finetune_metrics_port: int = Field(0, ge=0, description="Prometheus port of `finetune loop` (0: off).")
    finetune_metrics_host: str = Field(
        "127.0.0.1", description="Address of that port (0.0.0.0 in a pod, for probes and Prometheus)."
    )

    # Devices and parallelism
    finetune_device: str = Field("cpu", description="cpu, cuda, cuda:N, xla or auto (musicrl.device).")
    finetune_mixed_precision: bool = Field(True, description="bf16 autocast; only ever used on CUDA.")
    finetune_nproc: int = Field(1, ge=1, description="Data-parallel processes (torchrun) for RL training.")
    finetune_text_encoder: str = "minilm"
    """Prompt encoder (musicrl.text); must match the generator's."""
    finetune_torch_threads: int = Field(
        0, ge=0, description="Intra-op threads for training and evaluation (0: torch's default)."
    )

    # RL: which trainer, which reward, how long
    finetune_trainer: Literal["reinforce", "dpo"] = "reinforce"
    """RL trainer: `reinforce` or `dpo` (online DPO on the buffer's pairs)."""
    finetune_stage: Literal["R", "U", "RU"] = Field(
        "U",
        description=(
            "Reward of the cycle: `R` (text adherence + quality), `U` (preference) or `RU` (preference, KL against the "
            "R policy)."
        ),
    )
    finetune_reference_version: str | None = Field(
        None,
        description=(
            "Generator version whose policy the KL is taken against; default: see docs (base for R/U, R policy for RU)."
        ),
    )
    finetune_steps: int = Field(40, ge=1)
    """Most optimizer steps per cycle (the KL budget may stop it earlier)."""
    finetune_batch_size: int = Field(16, ge=1, description="Rollouts (or DPO pairs) per process per step.")
    finetune_group_size: int = Field(
        4,
        ge=2,
        description=(
            "Rollouts per prompt in a REINFORCE step; each one's baseline is the mean reward of the others (RLOO). "
            "Divides batch_size."
        ),
    )
    finetune_alpha: float = Field(
        0.01, gt=0, lt=1, description="Initial KL coefficient; the KL controller adapts it every step."
    )
    finetune_kl_target: float = Field(
        8.0,
        gt=0,
        description="KL to the cycle's starting policy the controller steers to by the last step, nats per clip.",
    )
    finetune_kl_budget: float = Field(
        12.0,
        gt=0,
        description="Early stop: training ends when the KL to the starting policy passes this (nats per clip).",
    )
    finetune_kl_gain: float = Field(
        0.5, gt=0, le=1, description="KL controller: alpha *= 1 + gain * clip(KL / target_t - 1, -0.5, 0.5) each step."
    )
    finetune_constraint_slack: float = Field(
        0.03,
        ge=0,
        description=(
            "Stage U: text adherence and quality may fall this far below the starting policy's before their Lagrange "
            "multipliers rise."
        ),
    )
    finetune_lagrange_lr: float = Field(
        0.5, ge=0, description="Step of the Lagrange multipliers, per standard deviation of violation."
    )
    finetune_candidate_every: int = Field(
        5, ge=1, description="Steps between candidate snapshots the gate chooses from."
    )
    finetune_policy_lr: float = Field(
        1.5e-3, gt=0, description="Policy learning rate (Adafactor's relative step; see docs/finetune.md)."
    )
    finetune_dpo_beta: float = Field(0.1, gt=0)
    """DPO beta."""
    finetune_optimizer: Literal["adafactor", "adamw"] = "adafactor"
    """Optimizer of the policy: `adafactor` (the paper's) or `adamw`."""
    finetune_max_grad_norm: float = Field(1.0, gt=0, description="Gradient-norm clipping of the policy.")
    finetune_temperature: float = Field(0.99, gt=0)
    """Sampling temperature of rollouts (the paper's)."""
    finetune_duration_s: float = Field(5.0, gt=0, description="Length of a rollout (and of the gate's clips).")
    finetune_checkpoint_every: int = Field(5, ge=0)
    """Steps between training checkpoints (0: none)."""
    finetune_seed: int = 0
    """Seed of prompts, rollout seeds and splits."""

    # Prompts
    finetune_user_prompt_fraction: float = Field(0.5, ge=0, le=1)
    """Share of rollout prompts taken from users (the rest from corpus captions)."""
    finetune_recent_policies: int = Field(
        8,
        ge=1,
        description="Buffer window: the newest policy versions read (the reward model replays a bounded sample of it).",
    )
    finetune_corpus_captions: int = Field(512, ge=0)
    """Corpus captions in the prompt pool."""
    finetune_heldout_fraction: float = Field(0.2, gt=0, lt=1)
    """Held-out share of prompts and of reward-model pairs."""
    finetune_eval_prompts: int = Field(24, ge=1)
    """Held-out prompts the evaluation gate scores."""
    finetune_eval_samples_per_prompt: int = Field(2, ge=1)
    """Seeds per held-out prompt in the evaluation gate."""

    # Preference reward model
    finetune_train_reward_model: bool = True
    """Train the preference reward model in U and RU cycles."""
    finetune_rm_min_pairs: int = Field(40, ge=2)
    """Fewest training pairs to train a preference model; fewer keeps the current one."""
    finetune_rm_fit: Literal["probe", "finetune"] = Field(
        "probe",
        description=(
            "How the preference model is fitted: `probe` (the parent generator frozen as the trunk, L2-regularised "
            "Bradley-Terry heads on its pooled states, refitted on the replay every cycle, accepted on a "
            "cross-validated accuracy) or `finetune` (the paper's: trunk and heads trained by AdamW, warm-started, "
            "accepted on the held-out split); see docs/finetune.md."
        ),
    )
    finetune_rm_l2: float = Field(
        250.0,
        gt=0,
        description=(
            "`probe`: L2 penalty on the heads' weights of standardised features, against the sum of the pairs' "
            "Bradley-Terry losses."
        ),
    )
    finetune_rm_cv_folds: int = Field(5, ge=2)
    """`probe`: folds of the cross-validated accuracy that decides whether the model is used."""
    finetune_rm_lr: float = Field(
        3e-4,
        gt=0,
        description=(
            "`finetune`: learning rate of the preference reward model (paper: 1e-4; 3e-4 generalised best on a few "
            "hundred pairs, see docs)."
        ),
    )
    finetune_rm_epochs: int = Field(4, ge=1)
    """`finetune`: epochs of preference reward model training."""
    finetune_rm_batch_size: int = Field(32, ge=1)
    """`finetune`: pairs per batch of preference reward model training (the paper's)."""
    finetune_rm_optimizer: Literal["adafactor", "adamw"] = Field(
        "adamw",
        description=(
            "`finetune`: optimizer of the preference reward model: `adamw` (measured best, see docs) or `adafactor` "
            "(the paper's)."
        ),
    )
    finetune_rm_warm_start: bool = Field(
        True,
        description=(
            "`finetune`: continue training the current preference model when its architecture matches the parent "
            "generator's (false: start from the generator every cycle)."
        ),
    )
    finetune_rm_max_pairs: int = Field(
        500,
        ge=4,
        description=(
            "Most training pairs per cycle: all of the current policy's (newest kept), a seeded sample of older ones "
            "fills the rest; held-out pairs at most a quarter of it."
        ),
    )
    finetune_max_pairs_per_user: int = Field(
        20,
        ge=0,
        description=(
            "Most reward-model pairs one user (pseudonym) contributes to a cycle, in the train and in the held-out "
            "split each; the newest are kept (0: no cap). One listener flooding votes cannot outweigh the others."
        ),
    )
    finetune_rm_heads: int = Field(4, ge=1)
    """Scalar heads of the preference model's ensemble, each fitted on its own bootstrap resample of the pairs."""
    finetune_rm_disagreement_penalty: float = Field(0.5, ge=0)
    """Served preference score = mean over heads - this x std over heads (0: the plain mean)."""

    # Evaluation gate
    finetune_gate_min_reward_gain: float = 0.0
    """Gate: the target reward must rise by more than this over the parent."""
    finetune_gate_max_kl: float = Field(50.0, gt=0, description="Nats per clip, against the reference policy.")
    finetune_gate_max_other_drop: float = Field(0.05, ge=0)
    """Gate: most any other reward component may fall against the parent."""

    # Loop triggers and single flight
    finetune_trigger_min_preferences: int = Field(
        150,
        ge=1,
        description=(
            "New preferences on the current policy that start a cycle (320 votes of the simulated listeners land about "
            "200)."
        ),
    )
    finetune_trigger_interval_s: float = Field(
        0.0, ge=0, description="Also start a cycle this long after the last one (0: data only)."
    )
    finetune_poll_interval_s: float = Field(10.0, gt=0)
    """How often `finetune loop` checks whether to start a cycle, in seconds."""
    finetune_lease_ttl_s: float = Field(120.0, gt=0, description="Lease expiry; renewed every step and every poll.")

    # Promotion: the offline gate, a canary judged by users' votes on mixed pairs, or both (docs/canary.md)
    finetune_promotion: Literal["gate", "canary", "both"] = Field(
        "gate",
        description=(
            "What decides a deploy: `gate` (the offline evaluation gate, then a full hot swap), `canary` (the best "
            "finite snapshot is served as the challenger in a share of pairs and users' votes on those mixed pairs "
            "promote or roll it back; the gate's checks are recorded, not enforced) or `both` (gate, then canary). "
            "docs/canary.md."
        ),
    )
    finetune_canary_share: float = Field(
        0.5, gt=0, le=1, description="Canary: share of generation requests whose pair is current vs candidate."
    )
    finetune_canary_alpha: float = Field(
        0.05,
        gt=0,
        lt=0.5,
        description=(
            "Canary: error rate of the sequential test. Promoting a candidate whose true win rate is at most 50 %, or "
            "rolling back one whose win rate is at least 50 %, happens with probability at most this (a time-uniform "
            "confidence sequence: valid however often the votes are looked at)."
        ),
    )
    finetune_canary_max_votes: int = Field(
        400,
        ge=1,
        description=(
            "Canary: most decided votes (wins + losses) on mixed pairs; at the cap the current policy stays and the "
            "canary is recorded `inconclusive`."
        ),
    )
    finetune_canary_max_s: float = Field(
        7200.0,
        gt=0,
        description=(
            "Canary: longest canary in seconds; at the cap, as for the vote cap: `inconclusive`, the current policy "
            "stays."
        ),
    )
    finetune_canary_model_name: str = Field(
        "generator_challenger",
        description=(
            "Canary: Triton model the candidate is served as (the gateway reads it from the registry's canary record)."
        ),
    )

    @model_validator(mode="after")
    def _budgets_nest(self) -> FinetuneSettings:
        """The cycle's KL target sits below its early stop, which sits below the gate's bound: a cycle that
        stays inside its budget can pass the gate by construction."""
        if not self.finetune_kl_target < self.finetune_kl_budget < self.finetune_gate_max_kl:
            raise ValueError(
                f"need finetune_kl_target < finetune_kl_budget < finetune_gate_max_kl, got "
                f"{self.finetune_kl_target}, {self.finetune_kl_budget}, {self.finetune_gate_max_kl}"
            )
        if self.finetune_constraint_slack >= self.finetune_gate_max_other_drop:
            raise ValueError("finetune_constraint_slack must be below finetune_gate_max_other_drop (the gate's bound)")
        if self.finetune_trainer == "reinforce" and self.finetune_batch_size % self.finetune_group_size:
            raise ValueError(
                f"finetune_batch_size ({self.finetune_batch_size}) must be a multiple of "
                f"finetune_group_size ({self.finetune_group_size})"
            )
        return self
