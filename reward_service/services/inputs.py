"""Turn request items into clips the models can score: a mono waveform at the
rate it came in (the reward suite resamples it for each model: 16 kHz for the
log-mel models, 48 kHz for CLAP, so a 32 kHz clip reaches CLAP at full
bandwidth) and, for the preference model, the clip's audio tokens.

Every way an item can be wrong ends in an ``InputError`` carrying the HTTP
status and a message that names the item, never in an unhandled exception.

Where the preference model's tokens come from:
- ``tokens`` items: the tokens themselves;
- ``clip_id`` items: the tokens stored for the clip in its generation record
  (exactly what the generator sampled). The record is the item's
  ``generation_id`` or else the one the gateway stamped on the stored WAV
  (user metadata ``musicrl.schemas.generation.CLIP_GENERATION_ID_METADATA``);
- other audio, and clips whose record cannot be found:
  ``musicrl.audio.codec.encode`` of the waveform.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from musicrl.audio.codec import SAMPLE_RATE
from musicrl.audio.formats import AudioLimits
from musicrl.schemas.generation import CLIP_GENERATION_ID_METADATA, clip_audio_key, generation_key
from musicrl.schemas.scores import ScoreItem
from musicrl.storage import ObjectNotFound, ObjectStore


@dataclass(frozen=True, eq=False)
class Clip:
    prompt: str
    wave: np.ndarray  # float32, mono, at sample_rate
    tokens: np.ndarray | None  # int64; None when the preference model is not asked for
    sample_rate: int = SAMPLE_RATE


class InputError(Exception):
    def __init__(self, status_code: int, detail: str):
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail


@dataclass(frozen=True)
class Limits:
    max_audio_s: float
    min_audio_s: float
    audio: AudioLimits  # what a WAV/FLAC header may ask for; checked before a sample is decoded

    @classmethod
    def from_settings(cls, settings: Any) -> Limits:
        """The limits of a ``RewardSettings``."""
        return cls(
            max_audio_s=settings.reward_max_audio_s,
            min_audio_s=settings.reward_min_audio_s,
            audio=AudioLimits(
                max_seconds=settings.reward_max_audio_s,
                min_sample_rate=settings.reward_min_sample_rate,
                max_sample_rate=settings.reward_max_sample_rate,
                max_channels=settings.reward_max_channels,
            ),
        )


_WAV_MAGIC = (b"RIFF", b"RIFX", b"RF64")
_FLAC_MAGIC = b"fLaC"


class InputResolver:
    def __init__(self, store: ObjectStore | None, limits: Limits, codec: ModuleType, formats: ModuleType):
        self.store = store
        self.limits = limits
        self.codec = codec
        self.formats = formats

    def resolve(self, item: ScoreItem, index: int, need_tokens: bool) -> Clip:
        where = f"items[{index}]"
        if item.tokens is not None:
            tokens = self._check_tokens(item.tokens, where)
            return Clip(
                item.prompt,
                np.asarray(self.codec.decode(tokens), dtype=np.float32),
                tokens,
                int(self.codec.SAMPLE_RATE),
            )
        if item.audio_b64 is not None:
            try:
                data = base64.b64decode(item.audio_b64, validate=True)
            except (binascii.Error, ValueError):
                raise InputError(422, f"{where}.audio_b64 is not valid base64") from None
            wave, rate = self._decode_audio(data, where + ".audio_b64")
            return Clip(item.prompt, wave, self._encode(wave, rate) if need_tokens else None, rate)
        data, stamped_generation = self._fetch_clip(item.clip_id, where)
        wave, rate = self._decode_audio(data, f"{where} (clip {item.clip_id})")
        tokens = None
        if need_tokens:
            if item.generation_id:
                tokens = self._recorded_tokens(item.clip_id, item.generation_id, where)
            elif stamped_generation:
                try:
                    tokens = self._recorded_tokens(item.clip_id, stamped_generation, where)
                except InputError:  # the stamp points nowhere useful; the audio is still scorable
                    tokens = None
            if tokens is None:
                tokens = self._encode(wave, rate)
        return Clip(item.prompt, wave, tokens, rate)

    # -- sources -----------------------------------------------------------------
    def _fetch_clip(self, clip_id: str, where: str) -> tuple[bytes, str | None]:
        """The clip's WAV bytes and the generation id stamped on it (if any), in one GET."""
        if self.store is None:
            raise InputError(422, f"{where}: this service has no object store configured; send audio_b64 or tokens")
        bucket, key = self.store.config.bucket_clips, clip_audio_key(clip_id)
        try:
            data, metadata = self.store.get_bytes_and_metadata(bucket, key)
        except ObjectNotFound:
            raise InputError(404, f"{where}: clip {clip_id} not found (no {bucket}/{key})") from None
        return data, metadata.get(CLIP_GENERATION_ID_METADATA)

    def _recorded_tokens(self, clip_id: str, generation_id: str, where: str) -> np.ndarray:
        bucket = self.store.config.bucket_generations
        try:
            record: dict[str, Any] = self.store.get_json(bucket, generation_key(generation_id))
        except ObjectNotFound:
            raise InputError(404, f"{where}: generation {generation_id} not found") from None
        except ValueError:
            raise InputError(422, f"{where}: generation {generation_id} is not a readable record") from None
        clips = record.get("clips", []) if isinstance(record, dict) else []
        for clip in clips:
            if isinstance(clip, dict) and clip.get("clip_id") == clip_id:
                tokens = clip.get("tokens")
                if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
                    raise InputError(422, f"{where}: generation {generation_id} holds no token list for clip {clip_id}")
                return self._check_tokens(tokens, f"{where} (tokens of generation {generation_id})")
        raise InputError(422, f"{where}: clip {clip_id} is not part of generation {generation_id}")

    # -- checks and conversions --------------------------------------------------
    def _check_tokens(self, tokens: list[int], where: str) -> np.ndarray:
        array = np.asarray(tokens, dtype=np.int64)
        vocab = int(self.codec.VOCAB_SIZE)
        if array.size and (array.min() < 0 or array.max() >= vocab):
            raise InputError(422, f"{where}: tokens must lie in [0, {vocab})")
        self._check_duration(array.size / float(self.codec.FRAME_RATE), where)
        return array

    def _check_duration(self, seconds: float, where: str) -> None:
        if seconds > self.limits.max_audio_s:
            raise InputError(413, f"{where}: {seconds:.1f} s of audio, the limit is {self.limits.max_audio_s:g} s")
        if seconds < self.limits.min_audio_s:
            raise InputError(422, f"{where}: {seconds:.2f} s of audio, at least {self.limits.min_audio_s:g} s needed")

    def _decode_audio(self, data: bytes, where: str) -> tuple[np.ndarray, int]:
        if not (data[:4] in _WAV_MAGIC or data[:4] == _FLAC_MAGIC):
            raise InputError(422, f"{where}: audio must be a WAV or FLAC file")
        formats = self.formats
        # Read the header first so that a small file claiming hours of audio, a
        # megahertz sample rate or dozens of channels is refused before any
        # sample is decoded.
        try:
            header = formats.read_header(data)
        except formats.AudioFormatError:
            raise InputError(422, f"{where}: not a readable WAV or FLAC file") from None
        try:
            formats.check_header(header, self.limits.audio)
        except formats.AudioOutOfRange as err:
            raise InputError(422, f"{where}: {err}") from None
        except formats.AudioTooLarge as err:
            raise InputError(413, f"{where}: {err}") from None
        if header.frames <= 0:
            raise InputError(422, f"{where}: the file holds no audio")
        self._check_duration(header.frames / header.samplerate, where)
        try:
            wave, sample_rate = formats.decode_audio(data, limits=None)  # the header was checked above
        except Exception:  # noqa: BLE001 - any decoder failure is the file's fault
            raise InputError(422, f"{where}: not a readable WAV or FLAC file") from None
        wave = np.asarray(wave, dtype=np.float32)  # decode_audio averages the channels
        if not np.isfinite(wave).all():
            raise InputError(422, f"{where}: the audio holds NaN or infinite samples")
        return wave, int(sample_rate)

    def _encode(self, wave: np.ndarray, sample_rate: int) -> np.ndarray:
        return np.asarray(self.codec.encode(wave, sample_rate), dtype=np.int64)
