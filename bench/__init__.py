"""Benchmark harness and the papers' experiments: ``python -m bench [--quick] [--out DIR]``.

One module per report section (kernels, layer_step, toys, mlp, resnet, lenet); shared
data loading (``data``), timing and metric math (``timing``, ``metrics``), training loop
(``train``), plots and the report writer. See bench/README.md for every command.
"""
