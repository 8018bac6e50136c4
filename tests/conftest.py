"""Test-wide settings: one intra-op thread (the suite is many small ops, where threads cost more than they give,
and the distributed tests run two processes on CI's two cores)."""

import torch

torch.set_num_threads(1)
