"""Settings for the real-model tests (tests/models)."""

import torch

# small tensors: one intra-op thread avoids contention when tox runs environments in parallel
torch.set_num_threads(1)
