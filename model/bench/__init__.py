"""Benchmarks of training, apart from the product code: ``quality`` (``mldcn bench quality``:
test AUC at matched FLOPs over seeds), ``train`` (``mldcn bench train``: throughput and memory),
``scale`` (``mldcn bench train-scale``: processes, threads and large tables) and ``results``
(the one writer of a benchmark's JSON and table, and the machine it ran on). Nothing in the
product packages imports them; the CLI only dispatches to them."""
