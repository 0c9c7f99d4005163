"""Long fault campaigns, run on demand (``python -m benchmarks.soak.<name> --help``):
crash (SIGKILL during ingest), disk (a full data filesystem), concurrency (many clients
storing the same study), fuzz (atheris harnesses).  Short versions live in tests/reliability/."""
