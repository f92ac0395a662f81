"""The GPU serving path: CUDA execution provider options and IOBinding runs per bucket.

:func:`cuda_provider_options` turns the settings into the CUDA execution provider's options
(explicit, so that a deployment never depends on ONNX Runtime's defaults changing);
:func:`resolve_providers` picks the providers for ``execution_provider`` (auto, cuda, cpu) and
says whether CUDA was asked for. :class:`BoundRunner` runs one session on fixed-shape buckets
through IOBinding: per bucket, input and output buffers are allocated once on the device
(``OrtValue``) and bound once; a call copies the (padded) rows into the bound inputs, runs, and
copies the output back. With ``cuda_graphs`` each bucket's run is annotated with its own
``gpu_graph_id`` (1, 2, ...; ONNX Runtime reserves 0), so the session captures one CUDA graph
per bucket on its first runs after warmup and replays it afterwards: the buffers must keep
their addresses, which is why they are preallocated and updated in place.

Everything here also works on the CPU provider with ``device="cpu"`` (no graphs), which is how
CI tests it.

Example:
    >>> opts = cuda_provider_options(device_id=1, gpu_mem_limit_bytes=2**30, cuda_graphs=True)
    >>> opts["device_id"], opts["gpu_mem_limit"], opts["enable_cuda_graph"]
    ('1', '1073741824', '1')
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import onnxruntime as ort

from export.meta import INPUT_NAMES, OUTPUT_NAME

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
ARENA_STRATEGIES = ("kNextPowerOfTwo", "kSameAsRequested")
GRAPH_ID_KEY = "gpu_graph_id"  # ONNX Runtime's run option (kOrtRunOptionsConfigCudaGraphAnnotation)

ProviderList = list[str | tuple[str, dict[str, str]]]


def cuda_provider_options(
    device_id: int = 0,
    arena_extend_strategy: str = "kSameAsRequested",
    gpu_mem_limit_bytes: int = 0,
    copy_in_default_stream: bool = True,
    cuda_graphs: bool = False,
) -> dict[str, str]:
    """The CUDA execution provider's options (every value a string, as ONNX Runtime takes them).

    ``gpu_mem_limit_bytes`` 0 leaves the arena unbounded (the key is omitted).
    ``cudnn_conv_algo_search`` is HEURISTIC: these graphs have no convolutions, and an
    exhaustive search would only slow start-up.
    """
    if device_id < 0:
        raise ValueError(f"device_id must be >= 0, got {device_id}")
    if arena_extend_strategy not in ARENA_STRATEGIES:
        raise ValueError(f"arena_extend_strategy must be one of {ARENA_STRATEGIES}, "
                         f"got {arena_extend_strategy!r}")
    if gpu_mem_limit_bytes < 0:
        raise ValueError(f"gpu_mem_limit_bytes must be >= 0, got {gpu_mem_limit_bytes}")
    opts = {
        "device_id": str(device_id),
        "arena_extend_strategy": arena_extend_strategy,
        "do_copy_in_default_stream": "1" if copy_in_default_stream else "0",
        "cudnn_conv_algo_search": "HEURISTIC",
        "enable_cuda_graph": "1" if cuda_graphs else "0",
    }
    if gpu_mem_limit_bytes:
        opts["gpu_mem_limit"] = str(gpu_mem_limit_bytes)
    return opts


def resolve_providers(
    choice: str, cuda_options: dict[str, str], available: Sequence[str] | None = None
) -> tuple[ProviderList, bool]:
    """(providers for ONNX Runtime, whether CUDA was asked for and is offered).

    ``cpu``: CPU only. ``auto``: CUDA (with ``cuda_options``) then CPU when
    ``onnxruntime.get_available_providers()`` lists CUDA, else CPU. ``cuda``: the same when it
    is listed; when it is not, CPU only, and the caller applies ``on_provider_fallback``.

    Example:
        >>> resolve_providers("auto", {}, available=["CPUExecutionProvider"])
        (['CPUExecutionProvider'], False)
        >>> resolve_providers("cuda", {"device_id": "0"},
        ...                   available=["CUDAExecutionProvider", "CPUExecutionProvider"])
        ([('CUDAExecutionProvider', {'device_id': '0'}), 'CPUExecutionProvider'], True)
    """
    if choice not in ("auto", "cuda", "cpu"):
        raise ValueError(f"execution_provider must be auto, cuda or cpu, got {choice!r}")
    available = ort.get_available_providers() if available is None else list(available)
    if choice == "cpu" or CUDA not in available:
        return [CPU], False
    return [(CUDA, dict(cuda_options)), CPU], True


class BoundRunner:
    """Fixed-shape runs of one session through IOBinding, one preallocated binding per bucket.

    Call it as ``runner(bucket, cat, dense)`` with exactly ``bucket`` rows (what
    :class:`service.buckets.BucketedRunner` hands it); returns a fresh (bucket,) float32 array.
    Runs of the same bucket are serialised (they share buffers, and a CUDA graph replay);
    different buckets may run concurrently.

    Args:
        session: the ONNX Runtime session (inputs ``cat_ids``, ``dense``; output
            ``probability``).
        buckets: the bucket sizes.
        num_cat, num_dense: the input widths.
        device: ``"cuda"`` or ``"cpu"`` (where the buffers live).
        device_id: the GPU.
        cuda_graphs: annotate each bucket's runs with its own ``gpu_graph_id``.
    """

    def __init__(self, session: ort.InferenceSession, buckets: Sequence[int], num_cat: int,
                 num_dense: int, device: str = "cuda", device_id: int = 0,
                 cuda_graphs: bool = False) -> None:
        if cuda_graphs and device != "cuda":
            raise ValueError("cuda_graphs needs device='cuda'")
        self.session = session
        self.device = device
        self.cuda_graphs = cuda_graphs
        self._slots: dict[int, _Slot] = {}
        for i, bucket in enumerate(sorted(buckets)):
            self._slots[bucket] = _Slot(session, bucket, num_cat, num_dense, device, device_id,
                                        graph_id=i + 1 if cuda_graphs else None)

    @property
    def buckets(self) -> tuple[int, ...]:
        return tuple(self._slots)

    def __call__(self, bucket: int, cat: np.ndarray, dense: np.ndarray) -> np.ndarray:
        slot = self._slots.get(bucket)
        if slot is None:
            raise ValueError(f"no binding for a {bucket}-row batch (buckets {self.buckets})")
        return slot.run(cat, dense)


class _Slot:
    """One bucket's device buffers, IOBinding and run options."""

    def __init__(self, session: ort.InferenceSession, bucket: int, num_cat: int,
                 num_dense: int, device: str, device_id: int, graph_id: int | None) -> None:
        self.bucket = bucket
        self.session = session
        self.cat = ort.OrtValue.ortvalue_from_shape_and_type(
            [bucket, num_cat], np.int64, device, device_id)
        self.dense = ort.OrtValue.ortvalue_from_shape_and_type(
            [bucket, num_dense], np.float32, device, device_id)
        self.out = ort.OrtValue.ortvalue_from_shape_and_type([bucket], np.float32, device,
                                                             device_id)
        self.binding = session.io_binding()
        self.binding.bind_ortvalue_input(INPUT_NAMES[0], self.cat)
        self.binding.bind_ortvalue_input(INPUT_NAMES[1], self.dense)
        self.binding.bind_ortvalue_output(OUTPUT_NAME, self.out)
        self.options = ort.RunOptions()
        if graph_id is not None:
            self.options.add_run_config_entry(GRAPH_ID_KEY, str(graph_id))
        self.lock = threading.Lock()

    def run(self, cat: np.ndarray, dense: np.ndarray) -> np.ndarray:
        if cat.shape[0] != self.bucket or dense.shape[0] != self.bucket:
            raise ValueError(f"a {self.bucket}-row bucket got {cat.shape[0]} and "
                             f"{dense.shape[0]} rows")
        with self.lock:
            # host -> device copies into the bound buffers (their addresses never change)
            self.cat.update_inplace(np.ascontiguousarray(cat, dtype=np.int64))
            self.dense.update_inplace(np.ascontiguousarray(dense, dtype=np.float32))
            self.session.run_with_iobinding(self.binding, self.options)
            # a copy: on the CPU provider numpy() is a view of the buffer the next run reuses
            return np.array(self.out.numpy(), copy=True)

