"""distnorm's benchmarks: what each normalization costs and what it buys, measured.

Run each from the repository root as a module (``python -m benchmarks.layer_overhead``,
``.scaling``, ``.communication``, ``.accuracy``); ``--help`` lists the options and
``--tiny`` runs a seconds-long configuration. ``python -m benchmarks.docs`` rebuilds
``docs/benchmarks.md`` from their results. See ``benchmarks/README.md``.
"""
