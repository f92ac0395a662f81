"""Benchmarks of exported graphs, apart from the product code: ``fusion`` (``mldcn bench
fusion``: ONNX Runtime latency of the plain and fused ML-DCN graphs). Nothing in the product
packages imports it; the CLI only dispatches to it."""
