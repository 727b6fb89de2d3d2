"""sbbench: stick-breaking attention, its backends, and the tools to check, time and tune them."""

__version__ = "0.1.0"

from sbbench.api import sb_attn, sb_attn_with_kvcache  # noqa: E402
from sbbench.core.registry import Backend, all_backends, backend_names, get_backend, register_backend  # noqa: E402

__all__ = ["sb_attn", "sb_attn_with_kvcache", "Backend", "all_backends", "backend_names", "get_backend", "register_backend", "__version__"]
