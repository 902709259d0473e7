"""End-to-end pipelines built from the library's parts (the demo and its report), shared by the CLI,
``benchmarks/`` and ``integration/``."""
