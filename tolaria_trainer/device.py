"""Parsing and validating --device values, with messages that say how to fix them."""

from __future__ import annotations

import re

import torch

from tolaria_trainer.errors import DeviceError

_DEVICE_RE = re.compile(r"^(?P<type>[a-z]+)(?::(?P<index>\d+))?$")
DEVICE_TYPES = ("cpu", "cuda", "mps")


def parse_device(spec: str) -> torch.device:
    """Turn 'cpu', 'cuda', 'cuda:1' or 'mps' into a torch.device that exists here.

    Raises DeviceError for a malformed string, an unknown type, CUDA/MPS missing, or an index past
    device_count.
    """
    text = spec.strip().lower()
    match = _DEVICE_RE.match(text)
    if match is None:
        raise DeviceError(f"malformed device {spec!r}: use cpu, cuda, cuda:N or mps")
    kind, index_text = match.group("type"), match.group("index")
    if kind not in DEVICE_TYPES:
        raise DeviceError(f"unknown device type {kind!r} in {spec!r}: use one of {', '.join(DEVICE_TYPES)}")
    if kind == "cpu":
        if index_text not in (None, "0"):
            raise DeviceError(f"device {spec!r}: the CPU has no index other than 0; use --device cpu")
        return torch.device("cpu")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device {spec!r}: CUDA is not available here (torch {torch.__version__}, "
                f"built with CUDA {torch.version.cuda}); use --device cpu or install a CUDA build of torch"
            )
        count = torch.cuda.device_count()
        index = int(index_text or 0)
        if index >= count:
            raise DeviceError(
                f"device {spec!r}: index {index} but only {count} CUDA device(s) (0..{count - 1}); "
                "pick a smaller index or check CUDA_VISIBLE_DEVICES"
            )
        return torch.device("cuda", index)
    if not torch.backends.mps.is_available():
        raise DeviceError(f"device {spec!r}: MPS is not available here; use --device cpu")
    if index_text not in (None, "0"):
        raise DeviceError(f"device {spec!r}: MPS has a single device; use --device mps")
    return torch.device("mps")
