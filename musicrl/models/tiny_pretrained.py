"""Tiny random stand-ins for pretrained checkpoints (no weights can be downloaded here).

Each builder writes what ``save_pretrained`` writes for the real model (config, weights,
tokenizer, feature extractor), with a few thousand random parameters, so code loads it exactly
as it would load ``laion/clap-htsat-unfused`` or ``facebook/musicgen-small``. Used by the tests
(``tests/pretrained_helpers.py``) and by ``musicrl gateway bench-musicgen``.
"""

from __future__ import annotations

from pathlib import Path

WORDS = "a calm piano melody fast drums sad strings happy brass slow loud soft guitar with and in the of".split()


def tiny_tokenizer(specials: list[str], pad: str, unk: str, **roles: str):
    """A whitespace word-level tokenizer over WORDS: specials first (their order fixes their ids)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(specials + WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=pad, unk_token=unk, **roles)


def tiny_clap(directory: Path, seed: int = 0) -> Path:
    """A ClapModel (2-stage HTSAT of width 32, one-layer RoBERTa of width 16), its tokenizer and the
    standard ClapFeatureExtractor (48 kHz, 10 s, unfused truncation)."""
    import torch
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel

    tokenizer = tiny_tokenizer(
        ["<s>", "<pad>", "</s>", "<unk>"], pad="<pad>", unk="<unk>", bos_token="<s>", eos_token="</s>"
    )
    audio = dict(
        spec_size=256,
        window_size=8,
        depths=[1, 1],
        num_attention_heads=[2, 2],
        hidden_size=32,
        patch_embeds_hidden_size=16,
        projection_dim=16,
        num_classes=4,
    )
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        projection_dim=16,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    ClapModel(ClapConfig(text_config=text, audio_config=audio, projection_dim=16)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    ClapFeatureExtractor(truncation="rand_trunc").save_pretrained(directory)
    return Path(directory)


def tiny_musicgen(
    directory: Path, seed: int = 0, guidance_scale: float | None = None, codebooks: int = 4, vocab_size: int = 16
) -> Path:
    """A MusicgenForConditionalGeneration saved as a snapshot of facebook/musicgen-small would be: a one-layer
    T5 of width 16, a one-layer decoder of width 16 over ``codebooks`` codebooks of ``vocab_size`` codes, and an
    EnCodec with musicgen-small's 32 kHz, 50 frames/s geometry (its encoder is never used), plus the T5 tokenizer.
    ``guidance_scale`` goes into the generation config, as musicgen-small ships guidance 3."""
    import torch
    from transformers import (
        EncodecConfig,
        MusicgenConfig,
        MusicgenDecoderConfig,
        MusicgenForConditionalGeneration,
        T5Config,
    )

    tokenizer = tiny_tokenizer(["<pad>", "</s>", "<unk>"], pad="<pad>", unk="<unk>", eos_token="</s>")
    text = T5Config(
        vocab_size=len(tokenizer),
        d_model=16,
        d_kv=8,
        d_ff=32,
        num_layers=1,
        num_heads=2,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    audio = EncodecConfig(
        sampling_rate=32_000,
        upsampling_ratios=[8, 5, 4, 4],
        target_bandwidths=[2.2],
        codebook_size=vocab_size,
        codebook_dim=8,
        hidden_size=8,
        num_filters=4,
        num_residual_layers=1,
        num_lstm_layers=1,
        audio_channels=1,
        normalize=False,
    )
    decoder = MusicgenDecoderConfig(
        vocab_size=vocab_size,
        max_position_embeddings=128,
        num_hidden_layers=1,
        ffn_dim=32,
        num_attention_heads=2,
        hidden_size=24,
        num_codebooks=codebooks,
        dropout=0.0,
        pad_token_id=vocab_size,
        bos_token_id=vocab_size,
        decoder_start_token_id=vocab_size,
    )
    torch.manual_seed(seed)
    model = MusicgenForConditionalGeneration(MusicgenConfig(text_encoder=text, audio_encoder=audio, decoder=decoder))
    for (
        layer
    ) in model.audio_encoder.quantizer.layers:  # a fresh EnCodec's codebooks are zeros: every code would sound alike
        layer.codebook.embed.normal_()
    if guidance_scale is not None:
        model.generation_config.guidance_scale = guidance_scale
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return Path(directory)
