"""ONNX export and the model repository.

- ``export.exporter``: run folder → parity-checked ONNX + model.json (imports torch and onnx).
- ``export.meta``: model.json, typed (``ModelMeta``, pydantic): its fields, their checks, format
  version 2 and the reading of version-1 files; the graph's tensor names and types.
- ``export.repository``: the repository's layout, the reader (``ModelRepository``,
  ``ModelVersion``) and the atomic-publish helpers; numpy, pydantic and the feature encoders
  only, so the scoring service can use it without torch.
- ``export.cli``: the ``mldcn export`` and ``mldcn models list`` sub-commands.
- ``export.bench``: the fused-graph latency benchmark (apart from the product code).

Importing this package imports none of them.
"""
