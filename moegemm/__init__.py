"""moegemm: FP8 and BF16 tensor-core GEMMs for Mixture-of-Experts LLMs on NVIDIA Hopper (SM90).

Kernels are CUDA C++ compiled at run time (nvcc or NVRTC), cached on disk and launched on torch's
current stream. CPU tensors run the pure-PyTorch reference. Importing never initialises CUDA.
The public names are those of ``moegemm.api``.
"""

from ._version import __version__  # noqa: F401
from .api import *  # noqa: F403
from .api import __all__  # noqa: F401
