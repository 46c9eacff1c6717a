"""Settings for the relaxed family's tests."""

import torch

# The tests use small tensors; one intra-op thread avoids thread contention when tox runs
# several environments in parallel on a small machine.
torch.set_num_threads(1)
