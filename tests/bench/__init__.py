"""`make bench`: speed, latency and memory of thox against llama-cpp-python
(run as `python -m tests.bench.run --out build/bench.json`)."""
