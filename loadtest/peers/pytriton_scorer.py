"""The same ONNX model behind NVIDIA PyTriton (Triton's HTTP/gRPC front end + dynamic batcher).

``pip install nvidia-pytriton`` (PyPI; no GPU needed) bundles Triton Inference Server; PyTriton
runs it as a subprocess and calls a Python function for each batch the dynamic batcher forms.
One model is bound, named as the repository model. Its inputs are the raw feature tensors, one
per schema field, named as the field: categorical fields ``BYTES`` (UTF-8 strings; ``""`` is
missing), numeric fields ``FP32`` (NaN is missing), each ``[batch, 1]`` (Triton batches along
the first axis, so a request sends its user and context values repeated to N rows;
:func:`loadtest.peers.bodies.triton_infer` builds such requests). The output is
``probability`` FP32 ``[batch, 1]``. The inference function (PyTriton's ``@batch``) decodes the
strings, encodes the rows with the model's own :class:`model.encoders.FeatureEncoders`, and runs
one ONNX Runtime session (CPU, ``--threads`` intra-op threads, default 1).

Dynamic batching is on: ``--max-batch-size`` rows per batch (default 4096; a larger request is
refused by Triton) and ``--max-queue-delay-us`` (default 0). HTTP on ``--host``/``--port``;
gRPC and metrics on ``--grpc-port``/``--metrics-port`` (default: free ones). Readiness is
Triton's own ``GET /v2/health/ready``; inference is ``POST /v2/models/{name}/infer`` (KServe
v2, with the binary tensor extension).

Run (SIGTERM or Ctrl-C stops Triton and the process)::

    python -m loadtest.peers.pytriton_scorer --repo models --model mldcn --port 8200

Two things this machine needs (both handled here, so a plain
``python -m loadtest.peers.pytriton_scorer`` works):

- **libpython.** PyTriton's Python 3.11 backend stub links ``libpython3.11.so.1.0``
  dynamically; where the system has another build of it (here Debian's, while the venv runs
  pyenv's), the stub must find the running interpreter's own library first. :func:`launch_env`
  puts the interpreter's ``LIBDIR`` first on ``LD_LIBRARY_PATH``; :func:`main` applies it to
  ``os.environ`` before Triton starts (PyTriton copies ``os.environ`` into the server's
  environment, which the stub inherits).
- **numpy < 2 in the stub.** The stub (``triton_python_backend_stub``, pybind11 built against
  numpy 1) misreads numpy 2 arrays: every ``BYTES`` input crashes it (``struct.error:
  unpack_from requires a buffer of at least 33686022 bytes ...``), and nvidia-pytriton pins
  ``numpy<2``. The stub runs an isolated embedded interpreter that takes its ``sys.path`` from
  the ``python`` PyTriton puts first on ``PATH`` (``sys.exec_prefix``), so when this process
  runs numpy >= 2, :func:`ensure_stub_env` makes a small venv for the stub (default
  ``<sys.prefix>/pytriton-stub-env``, or ``--stub-env``): the same base interpreter, its own
  ``numpy<2`` (pip, once), and a ``.pth`` that appends this environment's site-packages (zmq,
  the rest). PyTriton is pointed at it instead of ``sys.exec_prefix``. The two processes
  exchange tensors through PyTriton's own struct-header format, not pickles, so the numpy
  versions may differ.

Readiness: the model is written into a local model store before Triton starts
(``TritonLifecyclePolicy(launch_triton_on_startup=False, local_model_store=True)``), so Triton
loads it at start-up and ``/v2/health/ready`` is 200 only once it is loaded. (With PyTriton's
default policy Triton starts empty and the model is loaded afterwards: ``/v2/health/ready``
answers 200 for a few seconds before the model can score.)

This module imports ``pytriton`` only when serving, so it imports (and its doctests run)
without it.

Example:
    >>> env = launch_env({"LD_LIBRARY_PATH": "/opt/lib"})
    >>> env["LD_LIBRARY_PATH"].split(":")[1:]
    ['/opt/lib']
    >>> launch_env(env)["LD_LIBRARY_PATH"] == env["LD_LIBRARY_PATH"]  # idempotent
    True
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import venv
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from export.repository import ModelRepository, ModelVersion, RepositoryError
from model.encoders import FeatureEncoders

OUTPUT_NAME = "probability"
STUB_NUMPY = "numpy>=1.21,<2"  # what the stub's pybind11 build can read
STUB_ENV_VARIABLE = "MLDCN_PYTRITON_STUB_ENV"


def python_libdir() -> str:
    """The folder holding the running interpreter's ``libpython`` (sysconfig ``LIBDIR``)."""
    return str(sysconfig.get_config_var("LIBDIR") or "")


def launch_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``env`` (default ``os.environ``) with :func:`python_libdir` first on LD_LIBRARY_PATH."""
    out = dict(os.environ if env is None else env)
    libdir = python_libdir()
    parts = [p for p in out.get("LD_LIBRARY_PATH", "").split(":") if p and p != libdir]
    out["LD_LIBRARY_PATH"] = ":".join([libdir, *parts] if libdir else parts)
    return out


def default_stub_env() -> Path:
    """Where the stub's venv goes: ``$MLDCN_PYTRITON_STUB_ENV``, else in this environment."""
    return Path(os.environ.get(STUB_ENV_VARIABLE) or Path(sys.prefix) / "pytriton-stub-env")


def _numpy_major(python: Path) -> int | None:
    """numpy's major version as ``python`` imports it (None: it cannot)."""
    try:
        out = subprocess.run([str(python), "-c", "import numpy; print(numpy.__version__)"],
                             capture_output=True, text=True, timeout=60, env=launch_env())
    except (OSError, subprocess.TimeoutExpired):
        return None
    return int(out.stdout.split(".")[0]) if out.returncode == 0 and out.stdout else None


def ensure_stub_env(path: Path | None = None) -> Path:
    """The Python environment PyTriton's backend stub should run in (see the module docstring).

    ``sys.exec_prefix`` when this process's numpy is < 2; else the venv at ``path`` (default
    :func:`default_stub_env`), made on first use: base interpreter, ``numpy<2`` installed by
    pip into its site-packages, and a ``.pth`` appending this environment's site-packages.
    """
    if int(np.__version__.split(".")[0]) < 2:
        return Path(sys.exec_prefix)
    path = Path(path or default_stub_env())
    python = path / "bin" / "python"
    if python.exists() and _numpy_major(python) == 1:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another launcher may be making it right now
        if not (python.exists() and _numpy_major(python) == 1):
            _make_stub_env(path)
    return path


def _make_stub_env(path: Path) -> None:
    python = path / "bin" / "python"
    print(f"pytriton_scorer: making the stub environment {path} ({STUB_NUMPY}; once)",
          file=sys.stderr, flush=True)
    venv.EnvBuilder(with_pip=False, symlinks=True, clear=True).create(path)
    site = path / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--disable-pip-version-check", "--target", str(site), STUB_NUMPY],
                   check=True)
    ours = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (site / "zz_parent_env.pth").write_text("".join(f"{p}\n" for p in ours))
    if _numpy_major(python) != 1:
        raise RuntimeError(f"{python} does not import {STUB_NUMPY} after installing it")


def use_stub_env(path: Path) -> None:
    """Make PyTriton run its backend stub in the environment ``path``."""
    from pytriton.server import triton_server

    triton_server.get_triton_python_backend_python_env = lambda: path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def open_session(version: ModelVersion, threads: int = 1) -> Any:
    """An ONNX Runtime CPU session on the version's model.onnx."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(version.onnx_path), sess_options=opts,
                                providers=["CPUExecutionProvider"])


def _strings(values: np.ndarray) -> list[str]:
    """A BYTES column (bytes or str elements, any shape) as a flat list of str."""
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values.ravel().tolist()]


def score_batch(encoders: FeatureEncoders, session: Any,
                inputs: Mapping[str, np.ndarray]) -> np.ndarray:
    """Probabilities ``(batch, 1)`` float32 for raw feature tensors, one per schema field."""
    columns: dict[str, Any] = {}
    for f in encoders.schema.categorical:
        columns[f.name] = _strings(inputs[f.name])
    for f in encoders.schema.numeric:
        columns[f.name] = np.asarray(inputs[f.name], dtype=np.float32).ravel()
    cat, dense = encoders.transform(columns)
    probs = session.run([OUTPUT_NAME], {"cat_ids": cat, "dense": dense})[0]
    return np.asarray(probs, dtype=np.float32).reshape(-1, 1)


def make_infer_fn(encoders: FeatureEncoders, session: Any) -> Callable[..., dict[str, Any]]:
    """PyTriton inference callable (``@batch``): raw feature tensors in, ``probability`` out."""
    from pytriton.decorators import batch

    @batch
    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        return {OUTPUT_NAME: score_batch(encoders, session, inputs)}

    return infer


def warmup(encoders: FeatureEncoders, session: Any, sizes: Sequence[int] = (1, 64, 512)) -> None:
    """A few session runs at a few batch sizes before traffic."""
    for n in sizes:
        for _ in range(3):
            session.run([OUTPUT_NAME], {
                "cat_ids": np.zeros((n, len(encoders.cardinalities)), np.int64),
                "dense": np.zeros((n, encoders.num_dense), np.float32)})


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest.peers.pytriton_scorer",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", required=True, help="model repository folder")
    p.add_argument("--model", required=True, help="model name in the repository")
    p.add_argument("--version", type=int, default=None, help="version (default: latest)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP (and gRPC, metrics) address")
    p.add_argument("--port", type=int, default=8200, help="HTTP port")
    p.add_argument("--grpc-port", type=int, default=0, help="gRPC port (0: a free one)")
    p.add_argument("--metrics-port", type=int, default=0, help="metrics port (0: a free one)")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    p.add_argument("--instances", type=int, default=1,
                   help="model instances (one session and one Python callable each)")
    p.add_argument("--max-batch-size", type=int, default=4096,
                   help="rows per batch of the dynamic batcher (and per request)")
    p.add_argument("--max-queue-delay-us", type=int, default=0,
                   help="dynamic batcher: longest wait for more requests, microseconds")
    p.add_argument("--stub-env", type=Path, default=None,
                   help="venv for the backend stub when this one has numpy >= 2 (default: "
                        f"${STUB_ENV_VARIABLE} or <sys.prefix>/pytriton-stub-env)")
    p.add_argument("--log-level", default="warning")
    return p.parse_args(argv)


def serve(args: argparse.Namespace, version: ModelVersion) -> None:
    """Start Triton with the model bound and block until it stops (SIGTERM/SIGINT)."""
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig, TritonLifecyclePolicy

    encoders = version.encoders
    funcs = []
    for _ in range(args.instances):
        session = open_session(version, args.threads)
        warmup(encoders, session)
        funcs.append(make_infer_fn(encoders, session))
    inputs = [Tensor(name=f.name, dtype=np.bytes_ if f.type == "categorical" else np.float32,
                     shape=(1,)) for f in encoders.schema.fields]
    config = TritonConfig(
        http_address=args.host, http_port=args.port,
        grpc_address=args.host, grpc_port=args.grpc_port or free_port(args.host),
        metrics_address=args.host, metrics_port=args.metrics_port or free_port(args.host),
        log_verbose=0, exit_timeout_secs=5,
    )
    model_config = ModelConfig(
        max_batch_size=args.max_batch_size,
        batcher=DynamicBatcher(max_queue_delay_microseconds=args.max_queue_delay_us),
    )
    # model in a local store before Triton starts: /v2/health/ready means "can score"
    policy = TritonLifecyclePolicy(launch_triton_on_startup=False, local_model_store=True)
    with Triton(config=config, triton_lifecycle_policy=policy) as triton:
        triton.bind(model_name=version.name, infer_func=funcs if len(funcs) > 1 else funcs[0],
                    inputs=inputs, outputs=[Tensor(name=OUTPUT_NAME, dtype=np.float32,
                                                   shape=(1,))],
                    config=model_config, strict=False)
        print(f"pytriton_scorer: starting Triton for {version.name} version {version.version} on "
              f"http://{args.host}:{args.port} (max_batch_size {args.max_batch_size}, "
              f"max_queue_delay {args.max_queue_delay_us} us, {args.threads} intra-op threads)",
              file=sys.stderr, flush=True)
        triton.serve()


def main(argv: Sequence[str] | None = None) -> int:
    """Load the model, start PyTriton, serve until SIGTERM/SIGINT; the exit status."""
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import pytriton  # noqa: F401
    except ImportError:
        print("pytriton_scorer: error: nvidia-pytriton is not installed "
              "(pip install nvidia-pytriton)", file=sys.stderr)
        return 2
    try:
        version = ModelRepository(args.repo).load_version(args.model, args.version)
        version.encoders  # noqa: B018 (parse model.json now: errors before Triton starts)
    except RepositoryError as e:
        print(f"pytriton_scorer: error: {e}", file=sys.stderr)
        return 2
    os.environ.update(launch_env())
    try:
        use_stub_env(ensure_stub_env(args.stub_env))
    except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
        print(f"pytriton_scorer: error: cannot make the stub environment: {e}", file=sys.stderr)
        return 2
    # SIGTERM like Ctrl-C: PyTriton's serve() then stops Triton and cleans its workspace.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        serve(args, version)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
