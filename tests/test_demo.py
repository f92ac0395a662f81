"""The README's main command, `mldcn demo`, end to end (small and without the service)."""

from __future__ import annotations

import json

from export.repository import ModelRepository
from model.cli import demo_request, main
from service.schemas import ScoreRequest


def test_demo_trains_exports_and_builds_a_valid_request(tmp_path, capsys) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--rows", "3000", "--epochs", "1",
                 "--no-serve"]) == 0
    printed = capsys.readouterr().out
    assert "mldcn" in printed and "dcnv2" in printed and "Bayes AUC" in printed
    repo = ModelRepository(out / "models")
    assert sorted(repo.names()) == ["dcnv2", "mldcn"]
    for version in repo.list():
        version.verify()
    body = demo_request(out / "runs" / "mldcn")
    request = ScoreRequest.model_validate(body)
    assert request.model == "mldcn"
    schema = json.loads((out / "runs" / "mldcn" / "encoders.json").read_text())["schema"]
    sides = {f["name"]: f["side"] for f in schema["fields"]}
    assert all(sides[k] == "user" for k in body["user"])
    assert all(sides[k] == "context" for k in body["context"])
    assert all(sides[k] == "candidate" for k in body["candidates"])
    assert {len(v) for v in body["candidates"].values()} == {3}
