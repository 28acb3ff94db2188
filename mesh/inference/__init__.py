"""On-device inference: the model's tensor signature, runtime backends, activation and hot swap."""
