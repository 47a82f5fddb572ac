"""Benchmarks of vdit: commands that measure, never timed tests (``vdit bench --help``).

One module per responsibility:

==============  ==================================================================
``machine``     where and when a run happened: device, CPU, versions, date, load
``timing``      median-of-N timing after warm-up, compile timing, measured GEMM peak
``flops``       analytic model FLOPs and their cross-check with XLA's cost analysis
``memory``      ``memory_analysis`` of a compiled step and its analytic estimate
``peer``        the same DiT as diffusers' ``WanTransformer3DModel`` in PyTorch
``train``       DiT train step: time, FLOP/s, memory per remat/scan, against the peer
``profile``     a ``jax.profiler`` trace of a step summed per HLO op, by phase and kind
``sample``      sampler per-step latency, batched CFG against two passes, compile time
``vae``         chunked causal decode against whole-clip decode: bytes and time
``attention``   attention backends' time and memory against sequence length
``report``      tables for the terminal and ``docs/performance.md``
``command``     the ``vdit bench`` subcommands
==============  ==================================================================

Every benchmark returns a JSON-able dict with ``kind``, ``setup``, ``rows`` and
(added by ``command``) the machine stamp; ``report`` renders any of them.
"""
