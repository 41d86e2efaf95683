"""Benchmark harness and the papers' experiments: ``python -m bench [--quick] [--out DIR]``.

One module per report section (``cli.SECTIONS``: kernels, layer_step, toys, mlp,
mnist1d_conv, resnet, lenet, real_models); shared data loading (``data``), timing and metric
math (``timing``, ``metrics``), training loop (``train``), plots and the report writer.
See bench/README.md for every command.
"""
