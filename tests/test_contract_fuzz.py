"""Contract fuzzing: ``schemathesis run`` against a live ``mldcn serve`` must find no failure.

The server is real (``service_support.run_server``: a uvicorn subprocess on 127.0.0.1, on the
two models ``exported_models()`` trains and exports) and has an admin token, so the admin routes
are in ``/openapi.json`` and schemathesis calls them with ``Authorization: Bearer <token>``.
Schemathesis runs as its own CLI, in a subprocess, with every check it has (``--checks all``:
``status_code_conformance``, ``content_type_conformance``, ``response_schema_conformance``,
``response_headers_conformance``, ``positive_data_acceptance``, ``negative_data_rejection``,
``unsupported_method``, ``allow_header_conformance``, ``missing_required_header``, the stateful
and auth checks, ``max_response_time`` at its 10 s default) over all four phases (examples,
coverage, fuzzing, stateful). A failure fails the test with schemathesis's own report (each
failure with its check, the server's answer and a ``curl`` line that reproduces it).

Two deliberate exclusions, both narrow replacements in ``tests/schemathesis_hooks.py`` (the
test passes ``--exclude-checks not_a_server_error,positive_data_acceptance``):

* ``not_a_server_error_outside_budget`` runs the built-in check unchanged except on a *budget
  answer* of a scoring operation (``POST /v1/score`` and the two ``/v2 .../infer``): a 503
  ``predicted_deadline_miss``/``queue_full`` with ``Retry-After``, or a 504
  ``deadline_exceeded``. The schema documents both statuses there, and they are the latency
  budget working (README, "The latency budget"): a request that asks for 5e-324 ms *must* be
  refused. Any 500, any other 5xx (``not_ready``, ``draining``, no ``Retry-After``, ...), and a
  budget answer to another method or path (e.g. ``TRACE /v1/score`` shed instead of 405) still
  fail.
* ``positive_data_acceptance_outside_consistency`` runs the built-in check unchanged except on
  bodies whose validity JSON Schema cannot express: ``/v1/score`` columns of different lengths
  (a 422 naming the column), and ``/v2`` infer tensors that do not fit each other or the model
  (a 400 ``invalid_request`` naming the tensor, the protocol's answer).

Nothing else is filtered: a 422 for any other request the schema says is valid, a body that does
not match its documented model, an undocumented status all fail, since those are the contract
being wrong (in the schema or in the service).

Settings that keep the run fast and repeatable, none of which changes what is checked:
``warmup_runs=1`` (the fuzzer calls admin load/reload on the real models hundreds of times; each
one warms the model up), ``default_timeout_ms=1000`` (the budgets the fuzzer sends, header and
``timeout_ms``, decide the 503/504s, not how busy the CI machine is). The run is bounded by
``--max-examples`` per operation (not ``--max-time``, which repeats phases until the time is
spent), seeded, single-worker, without shrinking or an example database; the subprocess timeout
is only a guard against a hang.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from service_support import exported_models, run_server

HOOKS = Path(__file__).resolve().with_name("schemathesis_hooks.py")
SEED = 20251201
MAX_EXAMPLES = 150  # per operation and phase
HANG_GUARD_S = 300.0  # a guard against a hang only; the run itself takes about a minute


def schemathesis_command(url: str, token: str) -> list[str]:
    """The ``schemathesis run`` command line (the subprocess runs it in a scratch folder)."""
    return [
        sys.executable, "-m", "schemathesis.cli", "--no-color", "run", url,
        "--checks", "all", "--exclude-checks", "not_a_server_error,positive_data_acceptance",
        "--phases", "examples,coverage,fuzzing,stateful",
        "--max-examples", str(MAX_EXAMPLES), "--seed", str(SEED), "--no-shrink",
        "--generation-database", "none", "--workers", "1", "--continue-on-failure",
        "--request-timeout", "10", "--header", f"Authorization: Bearer {token}",
    ]


@pytest.mark.slow
def test_schemathesis_finds_no_failure(tmp_path: Path) -> None:
    """Every check, every phase, the live server: zero failures."""
    models = exported_models()
    token = secrets.token_urlsafe(16)
    env = {"MLDCN_ADMIN_TOKEN": token, "MLDCN_WARMUP_RUNS": "1",
           "MLDCN_DEFAULT_TIMEOUT_MS": "1000"}
    with run_server(models.repo, env=env) as server:
        status, _, body = server.request("GET", "/v2/models/mldcn")
        assert status == 200, body
        versions = json.loads(body)["versions"]
        fuzz_env = {**os.environ, "SCHEMATHESIS_HOOKS": str(HOOKS),
                    "MLDCN_FUZZ_MODELS": ",".join(sorted(models.runs)),
                    "MLDCN_FUZZ_VERSION": versions[0]}
        url = f"http://{server.host}:{server.port}/openapi.json"
        try:
            run = subprocess.run(schemathesis_command(url, token), cwd=tmp_path, env=fuzz_env,
                                 capture_output=True, text=True, timeout=HANG_GUARD_S)
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout
            pytest.fail(f"schemathesis still running after {HANG_GUARD_S:.0f} s:\n{out or ''}",
                        pytrace=False)
    report = run.stdout + (f"\n--- stderr ---\n{run.stderr}" if run.stderr.strip() else "")
    if run.returncode != 0:
        pytest.fail(f"schemathesis run failed (exit {run.returncode}):\n{report}", pytrace=False)
    selected = re.search(r"Selected: (\d+)/(\d+)", report)
    tested = re.search(r"Tested: (\d+)", report)
    assert selected and tested, report
    assert int(tested[1]) == int(selected[1]) == int(selected[2]), f"untested operations:\n{report}"
