import torch

# The tests' models are tiny: one thread is as fast, and it keeps parallel test processes from
# oversubscribing the cores (OpenMP spin-waits make that many times slower).
torch.set_num_threads(1)
