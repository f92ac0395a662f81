"""Per-model serving settings (``MODELS_DIR/<name>/config.json``, Triton's per-model config)
against a real server: two models with different ``max_batch_size`` on one server, what
``/v2/models/{name}`` shows, and a bad file refused at reload with the old settings kept."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from service_support import Models, exported_models, metric, request_for, run_server

from service.models import ModelLoadError
from service.registry import ServingConfig
from service.settings import Settings

TOKEN = "model-config-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def models() -> Models:
    return exported_models()


def _serving(server, name: str) -> dict:
    status, _, data = server.request("GET", f"/v2/models/{name}")
    assert status == 200, data
    return json.loads(data)["parameters"]["serving"]


def test_two_models_batch_by_their_own_config(models: Models, tmp_path: Path) -> None:
    repo = tmp_path / "models"
    shutil.copytree(models.repo, repo)
    (repo / "mlp" / "config.json").write_text(json.dumps(
        {"max_batch_size": 4, "max_queue_size": 7, "timeout_action": "reject",
         "pad_to_buckets": "on", "batch_buckets": [16, 2, 4]}))
    env = {"MLDCN_ADMIN_TOKEN": TOKEN, "MLDCN_DEFAULT_TIMEOUT_MS": "5000",
           "MLDCN_MAX_BATCH_SIZE": "512"}
    with run_server(repo, env) as server:
        assert _serving(server, "mlp")["max_batch_size"] == 4
        assert _serving(server, "mlp")["max_queue_size"] == 7
        assert _serving(server, "mldcn")["max_batch_size"] == 512  # the server-wide setting
        # padding per model: mlp padded to its own buckets (those its 4-row batches reach),
        # mldcn unpadded as the server-wide pad_to_buckets=auto says on the CPU
        assert _serving(server, "mlp")["batch_buckets"] == [2, 4, 16]
        assert _serving(server, "mlp")["pad_to_buckets"] == "on"
        assert _serving(server, "mldcn")["pad_to_buckets"] == "auto"
        log = server.log()
        assert re.search(r"serving mlp version 1 .*buckets 2,4,", log), log
        assert re.search(r"serving mldcn version 1 .*buckets off", log), log
        before = server.metrics()
        for name in ("mlp", "mldcn"):
            status, out = server.score(
                {**request_for(models.runs[name], 0, list(range(10))), "model": name})
            assert status == 200 and len(out["scores"]) == 10, out
        after = server.metrics()

        def batches(name: str) -> float:
            key = "mldcn_batch_size_rows_count"
            return (metric(after, key, model=name, version="1")
                    - metric(before, key, model=name, version="1"))

        assert batches("mlp") == 3  # 10 rows at most 4 per ONNX Runtime call: 4 + 4 + 2
        assert batches("mldcn") == 1
        # a bad file refuses the reload, names the key, and the old settings keep serving
        (repo / "mlp" / "config.json").write_text(json.dumps({"max_batch_size": 0}))
        status, _, data = server.request("POST", "/admin/models/mlp/reload", b"{}",
                                         headers=AUTH, timeout_s=60)
        assert status == 422, data
        assert "config.json" in json.loads(data)["message"]
        assert "max_batch_size" in json.loads(data)["message"]
        assert _serving(server, "mlp")["max_batch_size"] == 4
        # a good one applies at the next reload
        (repo / "mlp" / "config.json").write_text(json.dumps({"max_batch_size": 8}))
        status, _, data = server.request("POST", "/admin/models/mlp/reload", b"{}",
                                         headers=AUTH, timeout_s=60)
        assert status == 200, data
        assert _serving(server, "mlp")["max_batch_size"] == 8


@pytest.mark.parametrize("content, key", [
    ({"max_batch_size": 0}, "max_batch_size"),
    ({"max_queue_delay_ms": 5000}, "max_queue_delay_ms"),
    ({"timeout_action": "drop"}, "timeout_action"),
    ({"max_batch_size": "64"}, "max_batch_size"),  # strict: no string coercion
    ({"batch_size": 64}, "batch_size"),  # not a setting
    ({"batch_buckets": [64, 0]}, "batch_buckets"),
    ({"pad_to_buckets": "maybe"}, "pad_to_buckets"),
    ([], "config"),
])
def test_a_bad_config_file_names_the_key(tmp_path: Path, content, key: str) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(content))
    with pytest.raises(ModelLoadError, match=key):
        ServingConfig.for_model(Settings(repo=str(tmp_path)), "m")
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json"):
        ServingConfig.for_model(Settings(repo=str(tmp_path)), "m")
