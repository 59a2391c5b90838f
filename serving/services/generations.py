"""Generation use cases: create candidates, read records and clips, transcode audio.

Candidates of one request are sent to Triton concurrently (one inference
request each) so Triton's dynamic batcher batches them with other requests'.
Audio is stored before the record, so a stored record never points at missing
audio; the record is the single source of truth the feedback consumer joins on.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import time
import uuid
from collections.abc import Callable
from typing import TypeVar

import numpy as np
from minio.error import MinioException
from urllib3.exceptions import HTTPError

from musicrl.audio.formats import decode_audio, encode_audio
from musicrl.logging import get_logger
from musicrl.schemas.generation import (
    CLIP_GENERATION_ID_METADATA,
    ClipRecord,
    GenerationRecord,
    SamplingParams,
    Timings,
    clip_audio_key,
    generation_key,
)
from musicrl.storage import ObjectNotFound
from serving.errors import NotFound, RequestRejected, UpstreamFailed, UpstreamUnavailable
from serving.metrics import CHALLENGER_FALLBACKS, CLIPS, STORE_SECONDS, UPSTREAM_ERRORS
from serving.schemas import (
    MAX_SEED,
    MEDIA_TYPES,
    MIN_TEMPERATURE,
    ClipInfo,
    ClipOut,
    GenerationRequest,
    GenerationResponse,
)
from serving.services.embedding import PromptEmbedder
from serving.services.experiments import ExperimentArm, LiveExperiment
from serving.services.triton import Candidate, FramesOutOfRange, GeneratorClient
from serving.services.vote_tokens import VoteTokens
from serving.settings import GatewaySettings

log = get_logger(__name__)
T = TypeVar("T")


def candidate_seeds(request_seed: int, n: int) -> list[int]:
    """Independent, reproducible per-candidate seeds (SeedSequence spawning) in [0, 2**31)."""
    children = np.random.SeedSequence(request_seed).spawn(n)
    return [int(child.generate_state(1, dtype=np.uint32)[0] >> 1) for child in children]


def candidate_models(
    settings: GatewaySettings, request_seed: int, n: int, arm: ExperimentArm | None = None
) -> tuple[str | None, list[str]]:
    """The Triton model of each candidate: in an experiment, half current and half challenger.

    ``arm`` is the experiment running now (``LiveExperiment.current()``: the finetune worker's
    canary while one runs); None means the settings' experiment, if any. Whether a request
    takes part and which positions the challenger gets are drawn from the request seed, so
    replays assign the same arms and neither arm always sits in the first player.
    """
    current = settings.triton_model_name
    arm = arm if arm is not None else ExperimentArm.from_settings(settings)
    rng = random.Random(request_seed)
    if arm is None or n < 2 or rng.random() >= arm.share:
        return None, [current] * n
    models = [current, arm.challenger_model] * (n // 2) + [current] * (n % 2)
    rng.shuffle(models)
    return arm.name, models


class GenerationService:
    def __init__(
        self,
        settings: GatewaySettings,
        triton: GeneratorClient,
        store,
        text_encoder,
        vote_tokens: VoteTokens | None = None,
    ):
        self.settings = settings
        self.triton = triton
        self.store = store
        self.embedder = PromptEmbedder(text_encoder)
        self.vote_tokens = vote_tokens or VoteTokens.from_settings(settings)
        # The settings' experiment, or the finetune worker's canary while one runs (serving/services/experiments.py).
        self.experiments = LiveExperiment(settings, store)

    # ---- create -------------------------------------------------------------------------------

    async def create(self, request: GenerationRequest, key_name: str | None = None) -> GenerationResponse:
        """Generate, store and describe the candidates; with ``key_name`` (the caller's API key) and
        two clips or more, the answer carries the vote token of the pair."""
        s = self.settings
        start = time.perf_counter()
        n = request.n or s.gateway_default_candidates
        duration_s = request.duration_s if request.duration_s is not None else s.gateway_default_duration_s
        temperature = request.temperature if request.temperature is not None else s.gateway_default_temperature
        self._check_limits(request.prompt, n, duration_s, temperature)
        request_seed = request.seed if request.seed is not None else secrets.randbelow(MAX_SEED + 1)
        seeds = candidate_seeds(request_seed, n)
        experiment, models = candidate_models(s, request_seed, n, await self.experiments.current())

        # What each model takes comes from Triton (ModelSpec): the default generator the gateway's embedding of
        # the prompt (computed once per request), MusicGen the text. A model that cannot say is embedded for,
        # in case its candidates fall back to the current model.
        specs = await asyncio.gather(
            *(self.triton.model_spec(m) for m in dict.fromkeys(models)), return_exceptions=True
        )
        embedding = None
        if any(isinstance(spec, BaseException) or not spec.takes_text for spec in specs):
            embedding = await self.embedder.embed(request.prompt)
        embedded = time.perf_counter()
        candidates = await asyncio.gather(
            *(
                self._generate(model, request.prompt, embedding, seed, duration_s, temperature, request.top_k)
                for model, seed in zip(models, seeds)
            )
        )
        generated = time.perf_counter()
        if experiment and all(c.model_name == s.triton_model_name for c in candidates):
            experiment = None  # the challenger served nothing: this is not an experiment sample

        generation_id = uuid.uuid4().hex
        clip_ids = [uuid.uuid4().hex for _ in candidates]
        clips = [
            ClipRecord(
                clip_id=clip_id,
                index=i,
                seed=seed,
                policy_version=c.policy_version,
                model_name=c.model_name,
                tokens=c.tokens.tolist(),  # [T] for one codebook (as always), [K][T] for K (MusicGen)
                logprobs=c.logprobs.tolist(),
                duration_s=len(c.audio) / c.sample_rate,
                sample_rate=c.sample_rate,
                audio_key=clip_audio_key(clip_id),
            )
            for i, (clip_id, seed, c) in enumerate(zip(clip_ids, seeds, candidates))
        ]
        await asyncio.gather(*(self._store_clip(generation_id, clip, c) for clip, c in zip(clips, candidates)))
        record = GenerationRecord(
            generation_id=generation_id,
            prompt=request.prompt,
            app_id=request.app_id,
            experiment=experiment,
            params=SamplingParams(
                duration_s=duration_s, temperature=temperature, top_k=request.top_k, seed=request_seed
            ),
            clips=clips,
            # The stored record's timings end where its own write begins; the response's include it.
            timings=_timings(start, embedded, generated, time.perf_counter()),
        )
        await self._store_call(
            "put_record", self.store.put_json, s.bucket_generations, generation_key(generation_id), record.to_json()
        )
        timings = _timings(start, embedded, generated, time.perf_counter())
        for clip in clips:
            CLIPS.labels(clip.model_name, clip.policy_version).inc()
        log.info(
            "generation.created",
            generation_id=generation_id,
            n=n,
            duration_s=duration_s,
            experiment=experiment,
            policy_versions=[c.policy_version for c in clips],
            **timings.model_dump(),
        )
        vote_token, expires_at = None, None
        if key_name is not None and len(clips) >= 2:
            vote_token, expires_at = self.vote_tokens.issue(
                generation_id, [(clip.clip_id, clip.duration_s) for clip in clips], key_name, request.user_id
            )
        return GenerationResponse(
            generation_id=generation_id,
            created_at=record.created_at,
            prompt=record.prompt,
            experiment=experiment,
            clips=[self._clip_out(clip) for clip in clips],
            timings=timings,
            vote_token=vote_token,
            vote_token_expires_at=expires_at,
        )

    def _check_limits(self, prompt: str, n: int, duration_s: float, temperature: float) -> None:
        s = self.settings
        if len(prompt) > s.gateway_max_prompt_chars:
            raise RequestRejected(
                "prompt", f"prompt has {len(prompt)} characters; at most {s.gateway_max_prompt_chars} allowed"
            )
        if not 1 <= n <= s.gateway_max_candidates:
            raise RequestRejected("n", f"n must be between 1 and {s.gateway_max_candidates}, got {n}")
        if not s.gateway_min_duration_s <= duration_s <= s.gateway_max_duration_s:
            raise RequestRejected(
                "duration_s",
                f"duration_s must be between {s.gateway_min_duration_s} and {s.gateway_max_duration_s} s, "
                f"got {duration_s}",
            )
        if not MIN_TEMPERATURE <= temperature <= s.gateway_max_temperature:
            raise RequestRejected(
                "temperature",
                f"temperature must be in [{MIN_TEMPERATURE}, {s.gateway_max_temperature}], got {temperature}",
            )

    async def _generate(
        self, model: str, prompt: str, embedding, seed: int, duration_s: float, temperature: float, top_k: int
    ) -> Candidate:
        try:
            return await self._generate_on(model, prompt, embedding, seed, duration_s, temperature, top_k)
        except UpstreamUnavailable:
            if model == self.settings.triton_model_name:
                raise
            # An experiment must never cost the user their clip: fall back to the current policy.
            CHALLENGER_FALLBACKS.inc()
            log.warning("experiment.challenger_unavailable", model=model)
            return await self._generate_on(
                self.settings.triton_model_name, prompt, embedding, seed, duration_s, temperature, top_k
            )

    async def _generate_on(
        self, model: str, prompt: str, embedding, seed: int, duration_s: float, temperature: float, top_k: int
    ) -> Candidate:
        """One clip from ``model``, sent what it takes (``ModelSpec``) and ``duration_s`` in its own frames.

        A model that changed kind since its spec was learnt (a new config loaded) refuses the request;
        the spec is then learnt again and the request sent once more.
        """
        for attempt in (0, 1):
            spec = await self.triton.model_spec(model)
            n_frames = spec.frames_for(duration_s)
            if spec.max_frames is not None and n_frames > spec.max_frames:
                raise _too_long(model, spec.max_frames / spec.frame_rate, duration_s)
            if spec.takes_text:
                conditioning = prompt
            else:
                conditioning = embedding if embedding is not None else await self.embedder.embed(prompt)
            try:
                return await self.triton.generate(model, conditioning, seed, n_frames, temperature, top_k)
            except FramesOutOfRange as err:
                raise _too_long(model, err.max_frames / spec.frame_rate, duration_s) from err
            except UpstreamFailed:
                fresh = None
                if attempt == 0:
                    self.triton.forget(model)
                    fresh = await self.triton.model_spec(model)
                if fresh is None or fresh == spec:
                    raise
                log.info("triton.model_changed", model=model, before=spec.prompt_input, after=fresh.prompt_input)
        raise AssertionError("unreachable")

    async def _store_clip(self, generation_id: str, clip: ClipRecord, candidate: Candidate) -> None:
        wav = await asyncio.to_thread(_wav_bytes, candidate.audio, candidate.sample_rate)
        await self._store_call(
            "put_clip",
            self.store.put_bytes,
            self.settings.bucket_clips,
            clip.audio_key,
            wav,
            MEDIA_TYPES["wav"],
            {CLIP_GENERATION_ID_METADATA: generation_id},
        )

    def _clip_out(self, clip: ClipRecord) -> ClipOut:
        return ClipOut(
            clip_id=clip.clip_id,
            index=clip.index,
            audio_url=self._presign(clip.audio_key),
            download_url=f"/v1/clips/{clip.clip_id}/audio",
            duration_s=clip.duration_s,
            sample_rate=clip.sample_rate,
            num_codebooks=clip.num_codebooks,
            policy_version=clip.policy_version,
            model_name=clip.model_name,
            seed=clip.seed,
        )

    def _presign(self, key: str) -> str:
        # Presigning is a local HMAC computation (the region is configured), no network call.
        return self.store.presigned_get(
            self.settings.bucket_clips, key, expires_s=self.settings.gateway_presign_expiry_s
        )

    # ---- read ---------------------------------------------------------------------------------

    async def get(self, generation_id: str) -> GenerationRecord:
        raw = await self._store_call(
            "get_record", self.store.get_json, self.settings.bucket_generations, generation_key(generation_id)
        )
        return GenerationRecord.model_validate(raw)

    async def get_clip(self, clip_id: str) -> tuple[GenerationRecord, ClipRecord]:
        stat = await self._store_call("stat_clip", self.store.stat, self.settings.bucket_clips, clip_audio_key(clip_id))
        generation_id = stat.metadata.get(CLIP_GENERATION_ID_METADATA)
        if generation_id is None:
            raise NotFound(f"clip {clip_id} has no generation")
        record = await self.get(generation_id)
        clip = record.clip(clip_id)
        if clip is None:
            raise NotFound(f"clip {clip_id} is not in generation {generation_id}")
        return record, clip

    async def clip_info(self, clip_id: str) -> ClipInfo:
        record, clip = await self.get_clip(clip_id)
        return ClipInfo(
            clip_id=clip.clip_id,
            generation_id=record.generation_id,
            index=clip.index,
            prompt=record.prompt,
            policy_version=clip.policy_version,
            model_name=clip.model_name,
            seed=clip.seed,
            duration_s=clip.duration_s,
            sample_rate=clip.sample_rate,
            num_codebooks=clip.num_codebooks,
            audio_url=self._presign(clip.audio_key),
            download_url=f"/v1/clips/{clip.clip_id}/audio",
            created_at=record.created_at,
        )

    async def clip_audio(self, clip_id: str, fmt: str) -> bytes:
        wav = await self._store_call(
            "get_clip", self.store.get_bytes, self.settings.bucket_clips, clip_audio_key(clip_id)
        )
        if fmt == "wav":
            return wav
        return await asyncio.to_thread(_transcode, wav, fmt)

    # ---- object store calls -------------------------------------------------------------------

    async def _store_call(self, operation: str, fn: Callable[..., T], *args) -> T:
        """Run a blocking object-store call with the configured timeout; map failures to HTTP meaning."""
        start = time.perf_counter()
        outcome = "ok"
        try:
            return await asyncio.wait_for(asyncio.to_thread(fn, *args), timeout=self.settings.gateway_store_timeout_s)
        except ObjectNotFound as err:
            outcome = "not_found"
            raise NotFound(str(err)) from err
        except (MinioException, HTTPError, OSError, TimeoutError) as err:
            outcome = "unavailable"
            UPSTREAM_ERRORS.labels("object_store").inc()
            raise UpstreamUnavailable("object_store", f"{operation}: {type(err).__name__}: {err}") from err
        finally:
            STORE_SECONDS.labels(operation, outcome).observe(time.perf_counter() - start)


def _too_long(model: str, max_s: float, duration_s: float) -> RequestRejected:
    return RequestRejected(
        "duration_s",
        f"duration_s {duration_s} s is longer than the served model {model} can make ({max_s:.2f} s at most)",
    )


def _timings(start: float, embedded: float, generated: float, stored: float) -> Timings:
    return Timings(
        embed_ms=(embedded - start) * 1e3,
        triton_ms=(generated - embedded) * 1e3,
        store_ms=(stored - generated) * 1e3,
        total_ms=(stored - start) * 1e3,
    )


def _wav_bytes(audio: np.ndarray, sample_rate: int) -> bytes:
    return encode_audio(audio, sample_rate, "wav")


def _transcode(wav: bytes, fmt: str) -> bytes:
    wave, sample_rate = decode_audio(wav)
    return encode_audio(wave, sample_rate, fmt)
