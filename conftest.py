"""pytest set-up. Without a CUDA device, Triton kernels (quatnn.nn.norm_triton) run in
Triton's interpreter on CPU tensors, so the tests check them everywhere; without Triton
installed, that module is not collected for its docstring examples. The Ctrl-C tests need
SIGINT delivered: a suite started in the background by a non-interactive shell (``nohup
pytest &``) inherits it ignored, as would every process the tests start. Temporary files
(the docstring examples' ``tempfile.mkdtemp()``, torchrun's folders in the processes the
tests start) go to a folder of pytest's own, which pytest removes in later runs, not to
the system's temporary folder."""

import importlib.util
import os
import signal
import tempfile

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when triton is first imported

if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

collect_ignore = [] if importlib.util.find_spec("triton") else ["src/quatnn/nn/norm_triton.py"]


@pytest.fixture(autouse=True, scope="session")
def _temporary_files_in_pytests_folder(tmp_path_factory: pytest.TempPathFactory):
    folder = str(tmp_path_factory.mktemp("tempfile"))
    saved = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir, os.environ["TMPDIR"] = folder, folder
    yield
    tempfile.tempdir = saved[0]
    if saved[1] is None:
        os.environ.pop("TMPDIR")
    else:
        os.environ["TMPDIR"] = saved[1]
