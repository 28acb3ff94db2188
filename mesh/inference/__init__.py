"""On-device inference: runtime backends, activation and hot swap.

The model's tensor signature (what a manifest promises) is `mesh.artifacts.signature`.

backend.py    LiteRT / tflite-runtime behind one interface, chosen at start
tensors.py    request tensor validation and decoding (pure)
health.py     per-version request/error/latency counters, Prometheus export
runtime.py    ModelRuntime: activation with validation, atomic swap, rollback, worker pool
service.py    the Inference gRPC service over a ModelRuntime
optimize.py   INT8 post-training quantisation with LiteRT's calibrator
fixtures.py   purpose-built .tflite models for tests, benchmarks and the demo (runtime dependencies only)
"""
