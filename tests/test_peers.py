"""The benchmark's reference servers (``loadtest.peers``) and their request builders.

Builders are checked by decoding back what they built, and against the service's own encoder.
The servers are real subprocesses on 127.0.0.1 serving a real exported model (trained and
exported by ``service_support.exported_models``); their scores must equal ONNX Runtime run
in-process on the same encoded rows. The PyTriton peer runs only where ``nvidia-pytriton`` is
installed (it is large and not part of CI). Every process a test starts is killed in ``finally``.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from service_support import exported_models, free_port, request_for, run_server

from export.repository import ModelRepository, ModelVersion
from loadtest.peers import bodies as peer_requests
from loadtest.peers.bodies import (
    BuiltRequest,
    decode_infer_request,
    decode_infer_response,
    encode_body,
    score_json,
    service_infer,
    service_infer_encoded,
    triton_infer,
)
from loadtest.runner import launch
from model.schema import FeatureSchema, FieldSpec

TOLERANCE = 1e-6
FASTAPI_START_S = 60.0
PYTRITON_START_S = 120.0  # Triton start-up, and the stub venv made on the very first run

SCHEMA = FeatureSchema(fields=(
    FieldSpec("u", "categorical", side="user"),
    FieldSpec("age", "numeric", side="user"),
    FieldSpec("hour", "categorical", side="context"),
    FieldSpec("ad", "categorical", side="candidate"),
    FieldSpec("price", "numeric", side="candidate"),
    FieldSpec("slot", "categorical", side="candidate"),
))
BODY: dict[str, Any] = {
    "request_id": "r1",
    "user": {"u": 7, "age": 31.3},
    "context": {"hour": "13"},
    "candidates": {"ad": ["a", None, "é", 3.0], "price": [1.5, None, 0.1, 2]},
}


def _version() -> ModelVersion:
    return ModelRepository(exported_models().repo).load_version("mldcn")


def _body(rows: list[int], columnar: bool = True) -> dict[str, Any]:
    return request_for(exported_models().runs["mldcn"], rows[0], rows[1:], columnar=columnar)


def _reference(version: ModelVersion, body: dict[str, Any], float32: bool = False) -> np.ndarray:
    """ONNX Runtime in-process on the rows the server encodes for ``body``."""
    cat, dense = encode_body(body, version.encoders, float32_numeric=float32)
    return version.open_session().run(["probability"], {"cat_ids": cat, "dense": dense})[0]


# ---------------------------------------------------------------------------------------------
# request builders


def test_score_json_keeps_the_body() -> None:
    req = score_json(BODY)
    assert req.path == "/v1/score" and req.candidates == 4
    assert req.headers["Content-Type"] == "application/json"
    assert json.loads(req.body) == BODY


def test_triton_request_repeats_every_field_to_n_rows() -> None:
    req = triton_infer(BODY, "ctr", SCHEMA)
    assert isinstance(req, BuiltRequest)
    assert req.path == "/v2/models/ctr/infer" and req.candidates == 4
    length = int(req.headers["Inference-Header-Content-Length"])
    assert req.headers["Content-Type"] == "application/octet-stream"
    head, tensors = decode_infer_request(req.headers, req.body)
    assert len(json.dumps(head, separators=(",", ":")).encode()) == length
    assert head["id"] == "r1"
    assert head["outputs"] == [{"name": "probability", "parameters": {"binary_data": True}}]
    assert [(i["name"], i["datatype"], i["shape"]) for i in head["inputs"]] == [
        (f.name, "BYTES" if f.type == "categorical" else "FP32", [4, 1]) for f in SCHEMA.fields]
    assert tensors["u"].ravel().tolist() == [b"7"] * 4
    assert tensors["hour"].ravel().tolist() == [b"13"] * 4
    assert tensors["ad"].ravel().tolist() == [b"a", b"", "é".encode(), b"3"]
    assert tensors["slot"].ravel().tolist() == [b""] * 4  # left out: missing
    assert tensors["age"].dtype == np.float32
    np.testing.assert_array_equal(tensors["age"].ravel(), np.float32(31.3))
    price = tensors["price"].ravel()
    assert price[[0, 2, 3]].tolist() == np.float32([1.5, 0.1, 2.0]).tolist()
    assert math.isnan(price[1])


def test_row_candidates_build_the_same_request() -> None:
    rows = [dict(zip(BODY["candidates"], vals, strict=True))
            for vals in zip(*BODY["candidates"].values(), strict=True)]
    rows[1] = {"ad": None}  # price left out of one row: missing, like null
    body = {**BODY, "candidates": rows}
    for build in (triton_infer, service_infer):
        assert build(body, "ctr", SCHEMA).body == build(BODY, "ctr", SCHEMA).body


def test_service_request_sends_user_and_context_once() -> None:
    req = service_infer(BODY, "ctr", SCHEMA)
    head, tensors = decode_infer_request(req.headers, req.body)
    assert [(i["name"], i["shape"]) for i in head["inputs"]] == [
        ("u", [1]), ("age", [1]), ("hour", [1]), ("ad", [4]), ("price", [4])]  # no slot
    assert tensors["u"].tolist() == [b"7"] and tensors["hour"].tolist() == [b"13"]
    assert tensors["ad"].tolist() == [b"a", b"", "é".encode(), b"3"]


def test_encoded_request_matches_the_service_encoder() -> None:
    from service.encode import RequestEncoder

    version = _version()
    for columnar in (True, False):
        body = _body([0, 1, 2, 3, 4, 5], columnar=columnar)
        req = service_infer_encoded(body, "mldcn", version.encoders)
        head, tensors = decode_infer_request(req.headers, req.body)
        want_cat, want_dense = RequestEncoder(version.encoders).encode(
            body["user"], body["context"], body["candidates"])
        assert [(i["name"], i["datatype"]) for i in head["inputs"]] == [
            ("cat_ids", "INT64"), ("dense", "FP32")]
        np.testing.assert_array_equal(tensors["cat_ids"], want_cat)
        np.testing.assert_array_equal(tensors["dense"], want_dense)
        assert req.candidates == 5


@pytest.mark.parametrize("body, message", [
    ({"user": {"nope": 1}, "candidates": {"ad": ["a"]}}, "user.nope: not a user feature"),
    ({"user": {"ad": "a"}, "candidates": {"ad": ["a"]}}, "a candidate feature"),
    ({"user": {}, "candidates": {"ad": ["a", "b"], "price": [1.0]}}, "ragged"),
    ({"user": {}, "candidates": {"price": ["x"]}}, "price[0]: must be a finite number"),
    ({"user": {"age": True}, "candidates": {"ad": ["a"]}}, "age[0]"),
])
def test_builders_refuse_what_the_service_refuses(body: dict[str, Any], message: str) -> None:
    for build in (triton_infer, service_infer):
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
            build(body, "ctr", SCHEMA)


def test_decode_infer_response_reads_json_and_binary() -> None:
    probs = np.float32([0.25, 0.5])
    doc = {"outputs": [{"name": "probability", "datatype": "FP32", "shape": [2],
                        "data": probs.tolist()}]}
    assert decode_infer_response({}, json.dumps(doc).encode()).tolist() == probs.tolist()
    raw = probs.tobytes()
    head = json.dumps({"outputs": [{"name": "probability", "datatype": "FP32", "shape": [2, 1],
                                    "parameters": {"binary_data_size": len(raw)}}]}).encode()
    got = decode_infer_response({"inference-header-content-length": str(len(head))}, head + raw)
    assert got.tolist() == probs.tolist()


def test_our_service_scores_every_request_form_alike() -> None:
    """/v1/score, /v2 raw tensors ([1] broadcast) and /v2 encoded tensors: the same scores."""
    models = exported_models()
    version = ModelRepository(models.repo).load_version("mlp")
    body = request_for(models.runs["mlp"], 0, list(range(1, 40)))
    with run_server(models.repo, env={"MLDCN_MODELS": "mlp"}) as server:
        results = {}
        for name, req in (("score", score_json(body)),
                          ("raw", service_infer(body, "mlp", version.encoders.schema)),
                          ("encoded", service_infer_encoded(body, "mlp", version.encoders))):
            status, headers, data = server.request("POST", req.path, req.body, req.headers)
            assert status == 200, data[:300]
            results[name] = (np.asarray(json.loads(data)["scores"]) if name == "score"
                             else decode_infer_response(headers, data))
    ref = _reference(version, body)
    np.testing.assert_allclose(results["score"], ref, rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(results["encoded"], ref, rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(results["raw"], _reference(version, body, float32=True), rtol=0,
                               atol=TOLERANCE)


# ---------------------------------------------------------------------------------------------
# the servers


def _post(port: int, req: BuiltRequest | tuple[str, dict[str, str], bytes],
          timeout_s: float = 30.0) -> tuple[int, dict[str, str], bytes]:
    path, headers, body = req[:3]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        conn.request("POST", path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def _ready(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1.0)
    try:
        conn.request("GET", "/v2/health/ready")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def _descendants(pid: int) -> list[int]:
    import psutil

    with contextlib.suppress(psutil.Error):
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    return []


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@contextlib.contextmanager
def _peer(module: str, args: list[str], start_s: float) -> Iterator[tuple[int, subprocess.Popen]]:
    """Run ``python -m module ARGS --port P`` in its own session until ready; always kill it
    (the project's one launcher, ``loadtest.runner.launch``)."""
    port = free_port()
    with launch([sys.executable, "-m", module, *args, "--port", str(port)], module, port=port,
                start_timeout_s=start_s, log_in_error=True) as server:
        yield port, server.proc


def _stops_on_sigterm(proc: subprocess.Popen, timeout_s: float) -> None:
    """SIGTERM ends the server and every process it started, within ``timeout_s``."""
    children = _descendants(proc.pid)
    proc.send_signal(signal.SIGTERM)
    # 0, or -SIGTERM: uvicorn re-raises the signal it caught once it has shut down
    assert proc.wait(timeout=timeout_s) in (0, -signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while any(_alive(p) for p in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in children if _alive(p)], "children left running after SIGTERM"


def test_fastapi_peer_scores_like_onnx_runtime() -> None:
    version = _version()
    args = ["--repo", str(exported_models().repo), "--model", "mldcn", "--threads", "1"]
    with _peer("loadtest.peers.fastapi_scorer", args, FASTAPI_START_S) as (port, proc):
        for columnar in (True, False):
            body = {**_body(list(range(0, 60)), columnar), "request_id": "q", "model": "mldcn"}
            status, _, data = _post(port, score_json(body))
            assert status == 200, data[:300]
            doc = json.loads(data)
            assert (doc["request_id"], doc["model"], doc["version"]) == ("q", "mldcn", 1)
            np.testing.assert_allclose(doc["scores"], _reference(version, body), rtol=0,
                                       atol=TOLERANCE)
        # fields left out are missing values, as in our service
        body = _body([0, 1, 2])
        partial = {**body, "user": {}, "context": {}}
        status, _, data = _post(port, score_json(partial))
        assert status == 200
        np.testing.assert_allclose(json.loads(data)["scores"], _reference(version, partial),
                                   rtol=0, atol=TOLERANCE)
        assert _post(port, score_json({**body, "model": "other"}))[0] == 404
        bad = {**body, "candidates": {"ad_num0": ["x", "y"]}}
        assert _post(port, score_json(bad))[0] == 422
        assert _post(port, ("/v1/score", {"Content-Type": "application/json"}, b"{"))[0] == 422
        _stops_on_sigterm(proc, timeout_s=15)


def test_pytriton_peer_scores_like_onnx_runtime() -> None:
    pytest.importorskip("pytriton", reason="nvidia-pytriton is not installed (optional and large: "
                                           "pip install nvidia-pytriton); CI does not install it")
    version = _version()
    schema = version.encoders.schema
    args = ["--repo", str(exported_models().repo), "--model", "mldcn", "--threads", "1",
            "--max-batch-size", "1024"]
    with _peer("loadtest.peers.pytriton_scorer", args, PYTRITON_START_S) as (port, proc):
        # ready means it scores: the first request right after readiness succeeds
        for columnar, rows in ((True, list(range(0, 60))), (False, list(range(5, 9)))):
            body = _body(rows, columnar)
            req = triton_infer(body, "mldcn", schema)
            status, headers, data = _post(port, req)
            assert status == 200, data[:300]
            got = decode_infer_response(headers, data)
            assert got.shape == (req.candidates,)
            np.testing.assert_allclose(got, _reference(version, body, float32=True), rtol=0,
                                       atol=TOLERANCE)
        body = _body([0, 1, 2])
        partial = {**body, "user": {}, "context": {}}
        status, headers, data = _post(port, triton_infer(partial, "mldcn", schema))
        assert status == 200, data[:300]
        np.testing.assert_allclose(decode_infer_response(headers, data),
                                   _reference(version, partial, float32=True), rtol=0,
                                   atol=TOLERANCE)
        # JSON output works too
        status, headers, data = _post(port, triton_infer(body, "mldcn", schema, False))
        assert status == 200 and "inference-header-content-length" not in headers
        assert len(decode_infer_response(headers, data)) == 2
        status, _, _ = _post(port, peer_requests.binary_request("other", [], 0))
        assert status in (400, 404)
        _stops_on_sigterm(proc, timeout_s=30)
