"""pocketllm: on-device fine-tuning in about the memory of inference."""
__version__ = "0.1.0"
