"""pocketllm: on-device fine-tuning in about the memory of inference."""
import logging as _logging

__version__ = "0.1.0"

# transformers imports torchao whenever it is installed (the executorch extra brings it) for
# quantizers pocketllm does not use; torchao then warns on every command that its CUDA kernels
# do not load on this CPU and torch that its enums are registered the old way. Neither says
# anything a user can act on. (Setting a logger's level imports nothing.)
for _name in ("torchao", "torch.utils._pytree"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)
# (pocketllm's own commands also keep transformers from importing them at all: 47 MB a
# process, lean_import.py; a library import changes nothing in the caller's transformers.)
