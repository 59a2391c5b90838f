"""Checkpoint directory and ONNX export of the log-mel reward models (text adherence, quality).

A checkpoint directory holds `config.json` (AudioEncoderConfig), `weights.pt`
(state dict), `model.onnx` (input `mels` [n, n_mels, frames], output
`embedding` [n, dim] or `mos` [n]) and `meta.json` (kind, version, training
configuration, metrics, the command that produced it). The version is derived
from the weights, so a retrained model gets a new one.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import json
import warnings
from pathlib import Path

import torch

from musicrl.models.audio_encoder import AudioEncoderConfig, AudioTextEncoder, load_config, save_config
from musicrl.models.quality import MosRegressor

CONFIG_FILE, WEIGHTS_FILE, ONNX_FILE, META_FILE = "config.json", "weights.pt", "model.onnx", "meta.json"
MODEL_CLASSES = {"text_adherence": AudioTextEncoder, "quality": MosRegressor}
OUTPUTS = {"text_adherence": "embedding", "quality": "mos"}


def export_audio_onnx(model: torch.nn.Module, path: Path, output: str, opset: int = 17) -> Path:
    model = copy.deepcopy(model).cpu().eval()
    example = torch.zeros(2, model.config.n_mels, 500)
    with warnings.catch_warnings():
        # The TorchScript exporter needs no onnxscript; torch.export's would.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            input_names=["mels"],
            output_names=[output],
            dynamic_axes={"mels": {0: "n", 2: "frames"}, output: {0: "n"}},
            opset_version=opset,
        )
    return Path(path)


def write_checkpoint(
    model: torch.nn.Module, directory: Path, kind: str, output: str, training: dict, metrics: dict, command: str
) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_config(model.config, directory)
    torch.save(model.state_dict(), directory / WEIGHTS_FILE)
    export_audio_onnx(model, directory / ONNX_FILE, output)
    digest = hashlib.sha256((directory / WEIGHTS_FILE).read_bytes()).hexdigest()[:10]
    meta = {
        "kind": kind,
        "version": f"{kind}-1.0-{digest}",
        "created_at": dt.datetime.now(dt.UTC).isoformat(),
        "input": "log_mel (musicrl.audio.features): [n, 64, frames], 50 frames/s",
        "output": output,
        "parameters": sum(p.numel() for p in model.parameters()),
        "training": training,
        "metrics": metrics,
        "command": command,
    }
    (directory / META_FILE).write_text(json.dumps(meta, indent=2))
    return directory


def load_torch_model(directory: Path, kind: str) -> tuple[torch.nn.Module, dict]:
    directory = Path(directory)
    config: AudioEncoderConfig = load_config(directory)
    model = MODEL_CLASSES[kind](config)
    model.load_state_dict(torch.load(directory / WEIGHTS_FILE, map_location="cpu", weights_only=True))
    return model.eval(), json.loads((directory / META_FILE).read_text())
