"""Configuration of the reward service: environment variables ``MUSICRL_REWARD_*``
plus the shared object-store variables. Defaults suit one 2-core machine."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator

from musicrl.config import ObjectStoreConfig
from musicrl.schemas.scores import Component


class RewardSettings(ObjectStoreConfig):
    reward_host: str = "127.0.0.1"
    """Address `musicrl reward serve` binds."""
    reward_port: int = 8090
    """Port `musicrl reward serve` listens on."""

    # Reward models come from the model registry (bucket_models), following the
    # `current` pointer of reward/text_adherence, reward/quality, reward/preference.
    reward_impl: str = Field("onnx", description="Reward model implementation: onnx, torch or tiny.")
    reward_text_adherence_impl: Literal["default", "clap"] = Field(
        "default",
        description="Text-adherence model: default (the project's, served with reward_impl) "
        "or clap (LAION-CLAP, docs/models.md).",
    )
    reward_clap_path: str | None = Field(
        None,
        description="CLAP weights when reward_text_adherence_impl=clap: a local save_pretrained directory "
        "or s3://BUCKET/PREFIX (unset: the registry's current reward/text_adherence, which must then be a "
        "CLAP directory).",
    )
    reward_text_encoder: str = Field("minilm", description="Prompt encoder name for musicrl.text.load_text_encoder.")
    reward_model_cache_dir: Path = Path(".data/reward_models")
    """Local directory where reward model versions downloaded from the registry are kept."""
    reward_intra_op_threads: int = Field(
        1, ge=1, description="ONNX Runtime intra-op threads per session (CUDA is used when onnxruntime-gpu sees a GPU)."
    )

    # Micro-batching
    reward_max_batch_size: int = Field(32, ge=1, description="Most clips scored in one model call.")
    # 0: a batch is whatever queued while the previous one ran (the models gain little from
    # larger batches on a CPU, so an idle worker waiting for company only adds latency).
    reward_max_wait_ms: float = Field(0.0, ge=0, description="Longest a clip waits for others to join its batch.")
    reward_queue_max_items: int = Field(512, ge=1, description="Clips waiting to be scored before 429.")
    reward_retry_after_s: int = Field(1, ge=1, description="Retry-After header sent with 429.")

    # Payload limits
    reward_max_items: int = Field(64, ge=1, description="Items per request (413 above).")
    reward_max_audio_s: float = Field(60.0, gt=0, description="Longest clip accepted, in seconds (413 above).")
    reward_min_audio_s: float = Field(0.25, ge=0, description="Shortest clip accepted, in seconds (422 below).")
    # Read from a WAV/FLAC header before any sample is decoded: a few KB can claim a
    # megahertz rate or dozens of channels. The codec resamples to 16 kHz; 48 kHz covers CLAP.
    reward_min_sample_rate: int = Field(
        8_000, ge=1, description="Lowest audio sample rate accepted, in Hz (422 below)."
    )
    reward_max_sample_rate: int = Field(
        48_000, ge=1, description="Highest audio sample rate accepted, in Hz (422 above)."
    )
    reward_max_channels: int = Field(2, ge=1, description="Most audio channels accepted (422 above).")
    reward_max_body_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="Request body size (413 above).")

    # Combination of rewards when the request gives no weights.
    reward_default_weights: dict[Component, float] = {"text_adherence": 1.0, "quality": 1.0, "preference": 1.0}
    """Weight of each reward component when the request gives no weights."""

    # Hot reload
    reward_admin_token: SecretStr | None = Field(
        None, description="Bearer token of POST /v1/admin/reload; the route answers 403 when unset."
    )
    reward_poll_interval_s: float = Field(
        30.0, ge=0, description="How often the registry's current pointers are polled (0 disables)."
    )

    @model_validator(mode="after")
    def _sample_rate_range(self) -> RewardSettings:
        if self.reward_min_sample_rate > self.reward_max_sample_rate:
            raise ValueError("reward_min_sample_rate must not exceed reward_max_sample_rate")
        return self
