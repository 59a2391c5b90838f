"""Triton of the test stack runs a real Python-backend model, over gRPC and HTTP,
and swaps to a new version directory under load with zero failed requests."""

import shutil
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

pytestmark = pytest.mark.integration

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "triton_models" / "stack_echo"
CLIENTS = 4


@pytest.fixture
def echo_model(stack):
    """Install the test model under a unique name (tests share one Triton) and load it."""
    name = f"stack_echo_{uuid.uuid4().hex[:8]}"
    model_dir = stack.triton_repo / name
    shutil.copytree(FIXTURE, model_dir)
    config = model_dir / "config.pbtxt"
    config.write_text(config.read_text().replace('name: "stack_echo"', f'name: "{name}"'))
    client = grpcclient.InferenceServerClient(stack.triton_grpc_url)
    client.load_model(name)
    yield name, model_dir
    client.unload_model(name)
    shutil.rmtree(model_dir)


def grpc_infer(client, name: str, values: np.ndarray):
    tensor = grpcclient.InferInput("INPUT", list(values.shape), "FP32")
    tensor.set_data_from_numpy(values)
    result = client.infer(name, [tensor])
    return result.as_numpy("OUTPUT"), int(result.as_numpy("VERSION")[0, 0])


def test_infer_over_grpc_and_http(stack, echo_model):
    name, _ = echo_model
    values = np.arange(6, dtype=np.float32).reshape(2, 3)

    output, version = grpc_infer(grpcclient.InferenceServerClient(stack.triton_grpc_url), name, values)
    np.testing.assert_array_equal(output, values)
    assert version == 1

    http = httpclient.InferenceServerClient(stack.triton_http_url)
    tensor = httpclient.InferInput("INPUT", list(values.shape), "FP32")
    tensor.set_data_from_numpy(values)
    result = http.infer(name, [tensor])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT"), values)
    assert http.is_model_ready(name)


def test_new_version_loads_under_load_without_failed_requests(stack, echo_model):
    name, model_dir = echo_model
    stop = threading.Event()
    answers: list[int] = []
    failures: list[str] = []
    lock = threading.Lock()

    def client_loop():
        client = grpcclient.InferenceServerClient(stack.triton_grpc_url)
        values = np.ones((1, 4), dtype=np.float32)
        while not stop.is_set():
            try:
                output, version = grpc_infer(client, name, values)
                assert np.all(output == version), f"version {version} answered {output}"
                with lock:
                    answers.append(version)
            except Exception as err:  # every failure is counted, none may happen
                with lock:
                    failures.append(repr(err))

    threads = [threading.Thread(target=client_loop) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        shutil.copytree(model_dir / "1", model_dir / "2")
        grpcclient.InferenceServerClient(stack.triton_grpc_url).load_model(name)
        served_before = len(answers)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (len(answers) - served_before < 20):
            time.sleep(0.1)
    finally:
        stop.set()
        for t in threads:
            t.join()

    assert failures == []
    assert answers[0] == 1 and answers[-1] == 2
    assert set(answers) == {1, 2}
