"""Where a model runs: :func:`check_device` turns a ``--device`` string into one that works here,
or one clear error.

torch's own failures for a device it cannot use are an ``AssertionError`` ("Torch not compiled
with CUDA enabled") or a ``RuntimeError`` deep inside ``model.to``, after the model has loaded;
checking the name first gives the user one line naming the value and the fix, before anything
heavy runs. torch is imported inside the function.
"""

from __future__ import annotations

from allocator.core.errors import InvalidParameterError

__all__ = ["check_device"]


def check_device(device: str, *, flag: str = "--device") -> str:
    """``device`` (``cpu``, ``cuda``, ``cuda:1``, ``mps``) normalised by torch, if usable here.

    Raises:
        InvalidParameterError: not a torch device name, or a device this machine does not have
            (CUDA not built in or no GPU visible, a GPU index beyond the visible ones, no MPS).
    """
    import torch

    if not isinstance(device, str) or not device.strip():
        raise InvalidParameterError(f"{flag} must be a device name like 'cpu' or 'cuda:0', got {device!r}")
    try:
        dev = torch.device(device.strip())
    except (RuntimeError, ValueError):
        raise InvalidParameterError(f"{flag} {device!r} is not a device name; use cpu, cuda, "
                                    f"cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch is built without CUDA" if torch.version.cuda is None
                   else "no CUDA GPU is visible (check the driver and CUDA_VISIBLE_DEVICES)")
            raise InvalidParameterError(f"{flag} {device}: CUDA is not available here ({why}); "
                                        f"use {flag} cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise InvalidParameterError(f"{flag} {device}: only {count} CUDA device(s) are visible "
                                        f"(cuda:0..cuda:{count - 1})")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise InvalidParameterError(f"{flag} {device}: MPS is not available here; use {flag} cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise InvalidParameterError(f"{flag} {device!r}: bitalloc runs models on cpu, cuda or mps, "
                                    f"not {dev.type}")
    # torch ignores a CPU index ("cpu:0" is the one CPU); one spelling keeps comparisons simple
    return "cpu" if dev.type == "cpu" else str(dev)
