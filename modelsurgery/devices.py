"""Which torch device a ``--device`` value names, checked against this machine: one owner for every
operation and command (quantize, merge, analyze, extract), so the accepted values and messages agree."""

from __future__ import annotations

from modelsurgery.errors import SurgeryError

EXPECTED = "expected cpu, cuda, cuda:N or auto"


def resolve_device(value: str | None, flag: str = "--device") -> str | None:
    """'auto' -> cuda when present, else cpu; 'cpu', 'cuda', 'cuda:N' (and 'mps' where present) when this
    machine has them; anything else is a one-line error naming ``flag``. None stays None."""
    if value is None:
        return None
    import torch  # imported here: the CLI checks options before any heavy import

    if value == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise SurgeryError(f"{flag} {value}: not a device ({EXPECTED})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SurgeryError(f"{flag} {value}: CUDA is not available on this machine (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SurgeryError(f"{flag} {value}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise SurgeryError(f"{flag} {value}: MPS is not available on this machine (use --device cpu)")
    elif device.type != "cpu":
        raise SurgeryError(f"{flag} {value}: unsupported device type ({EXPECTED})")
    return value
