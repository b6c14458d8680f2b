"""ttmm: Test-Time Model Merging (Bertolissi et al., COLM 2025, arXiv 2505.14136).

Cluster a corpus, train one LoRA expert per cluster, and for every prompt merge the experts
nearest to it into one model. See README.md for the command line and the Python API.
"""

import os

# A fold under the swap memory policy writes each merged weight into a fresh tensor (see
# ttmm.fold). With 4 KiB pages the kernel faults in and zeroes ~100k pages per merge of
# SmolLM2-135M, which doubles its cost; PyTorch's THP_MEM_ALLOC_ENABLE backs large CPU
# tensors with transparent huge pages instead.
# PyTorch reads it once, at its first allocation, so this only applies when ttmm is imported
# before torch allocates anything (as the `ttmm` command does); set it yourself otherwise.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__version__ = "0.1.0"
