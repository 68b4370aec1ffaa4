import os

import torch

# Tests are small: one thread keeps them fast to schedule and deterministic.
torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
