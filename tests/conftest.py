import torch

# pytest -n 2 runs two workers on this 2-core machine: one thread each avoids oversubscription
torch.set_num_threads(1)
