"""Tiny random stand-ins for pretrained checkpoints (the builders live in ``musicrl.models.tiny_pretrained``).

Each builder writes what ``save_pretrained`` writes for the real model (config, weights,
tokenizer, feature extractor), with a few thousand random parameters, so the code under
test loads it exactly as it would load ``laion/clap-htsat-unfused`` or ``facebook/musicgen-small``.
"""

from __future__ import annotations

import pytest

from musicrl.models.tiny_pretrained import WORDS, tiny_clap, tiny_musicgen, tiny_tokenizer  # noqa: F401 - re-exported


@pytest.fixture(scope="module", autouse=True)
def one_thread_per_module():
    """One intra-op thread for the whole module, its module-scoped models included (imported, it is autouse there)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
