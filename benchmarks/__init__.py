"""Speed and memory suite (run as `python -m benchmarks.bench_loss`); see README.md here."""
