"""ONNX export and the model repository.

- ``export.exporter``: run folder → parity-checked ONNX + model.json (imports torch and onnx).
- ``export.repository``: the repository's layout, the model.json format, the reader
  (``ModelRepository``, ``ModelVersion``) and the atomic-publish helpers; numpy and the
  feature encoders only, so the scoring service can use it without torch.
- ``export.cli``: the ``mldcn export`` and ``mldcn models list`` sub-commands.

Importing this package imports none of them.
"""
