"""pytest set-up. Without a CUDA device, Triton kernels (quatnn.nn.norm_triton) run in
Triton's interpreter on CPU tensors, so the tests check them everywhere; without Triton
installed, that module is not collected for its docstring examples."""

import importlib.util
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when triton is first imported

collect_ignore = [] if importlib.util.find_spec("triton") else ["src/quatnn/nn/norm_triton.py"]
