"""The backends. Importing this package registers every built-in backend in the registry."""

from sbbench.kernels import reference  # noqa: F401  (registers "reference")
from sbbench.kernels import chunked  # noqa: F401
from sbbench.kernels import compiled  # noqa: F401
from sbbench.kernels import triton_sb  # noqa: F401
from sbbench.kernels import comparators  # noqa: F401
