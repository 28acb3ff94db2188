"""On-device inference: the model's tensor signature, runtime backends, activation and hot swap.

signature.py  what a manifest promises about a model's tensors (codec, matching)
backend.py    LiteRT / tflite-runtime behind one interface, chosen at start
tensors.py    request tensor validation and decoding (pure)
health.py     per-version request/error/latency counters, Prometheus export
runtime.py    ModelRuntime: activation with validation, atomic swap, rollback, worker pool
service.py    the Inference gRPC service over a ModelRuntime
optimize.py   INT8 post-training quantisation with LiteRT's calibrator
fixtures.py   purpose-built .tflite models for tests and benchmarks (needs the test extras)
"""
