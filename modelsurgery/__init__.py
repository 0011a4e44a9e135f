"""modelsurgery: surgery on neural-network checkpoints."""

from modelsurgery.errors import SurgeryError

__version__ = "0.1.0"
__all__ = ["SurgeryError", "__version__"]
