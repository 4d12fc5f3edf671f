"""Small utilities shared by every part of the project (EDM-compatible names)."""
from .util import EasyDict  # noqa: F401
