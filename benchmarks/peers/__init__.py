"""fxlens side by side with TransformerLens 4.3 (``TransformerBridge``), nnsight 0.8 and plain HF hooks.

Run with ``make bench`` (or ``PYTHONPATH=benchmarks .venv-peers/bin/python -m peers``). Modules:

- :mod:`peers.common`: workload constants, timing statistics, equality checks (pure, tested);
- :mod:`peers.tools`: one adapter per tool (forward, cache-all, patching sweep);
- :mod:`peers.workloads`: the in-process timed workloads, checked for equal results first;
- :mod:`peers.probe`: fresh-subprocess probes (setup and first-call latency, peak RSS);
- :mod:`peers.report`: ``benchmarks/RESULTS.md`` and the bar chart.
"""
