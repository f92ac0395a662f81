"""Reference servers ("peers") for the serving benchmark, and the requests that drive them.

The same exported ONNX model served three ways, so that one open-loop load can be compared:

- our service (``mldcn serve``): ``POST /v1/score`` or ``POST /v2/models/{name}/infer``;
- :mod:`loadtest.peers.fastapi_scorer`: a plain FastAPI + ONNX Runtime scorer, as a typical
  engineer would write it (sync endpoint, no batching across requests);
- :mod:`loadtest.peers.pytriton_scorer`: the model behind NVIDIA PyTriton (Triton Inference
  Server's HTTP front end and dynamic batcher calling a Python function).

:mod:`loadtest.peers.bodies` turns one ``/v1/score`` body into the request each of them takes.
Every server answers ``GET /v2/health/ready`` with 200 once it can score.
"""
