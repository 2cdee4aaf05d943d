"""pytest set-up. Without a CUDA device, Triton kernels (quatnn.nn.norm_triton) run in
Triton's interpreter on CPU tensors, so the tests check them everywhere; without Triton
installed, that module is not collected for its docstring examples. The Ctrl-C tests need
SIGINT delivered: a suite started in the background by a non-interactive shell (``nohup
pytest &``) inherits it ignored, as would every process the tests start."""

import importlib.util
import os
import signal

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when triton is first imported

if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

collect_ignore = [] if importlib.util.find_spec("triton") else ["src/quatnn/nn/norm_triton.py"]
