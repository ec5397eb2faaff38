"""Which deployment runtime a pruned network is for, and the channel multiple its kernels need.

Fast CPU convolution kernels work on channels in blocks of one SIMD register (oneDNN's nChw16c,
ONNX Runtime's NCHWc): a channel count that is not a multiple of the block falls back to plain,
much slower kernels, so "fewer FLOPs" can mean "slower". `round_to="auto"` resolves here to that
block for the chosen runtime on this machine. Reads /proc/cpuinfo only; never measures or exports.
"""
from __future__ import annotations

import functools
import logging
import platform
from dataclasses import dataclass
from enum import Enum
from typing import Any, Dict, Optional, Tuple, Union

logger = logging.getLogger(__name__)

__all__ = ["Runtime", "RUNTIMES", "Rounding", "check_runtime", "cpu_vector_floats", "channel_multiple",
           "resolve_round_to", "check_round_to", "latency_backend", "latency_kwargs"]

AUTO = "auto"
_LOGGED: set = set()


class Runtime(str, Enum):
    """Where the pruned network will be served.

    CPU runtimes are measured on this machine; the GPU ones are written from their vendors'
    documentation and have not been run here (no GPU): their rounding is NVIDIA's guidance for
    Tensor Cores (FP16 channel counts in multiples of 8) and their latency backend is not built.
    """

    PADDLE_INFERENCE = "paddle_inference"  # Paddle Inference, CPU, oneDNN kernels
    ONNXRUNTIME = "onnxruntime"  # ONNX Runtime, CPUExecutionProvider (MLAS NCHWc kernels)
    PADDLE_INFERENCE_GPU = "paddle_inference_gpu"  # not run here
    ONNXRUNTIME_CUDA = "onnxruntime_cuda"  # not run here

    @property
    def gpu(self) -> bool:
        return self in (Runtime.PADDLE_INFERENCE_GPU, Runtime.ONNXRUNTIME_CUDA)


RUNTIMES = tuple(r.value for r in Runtime)
_GPU_MULTIPLE = 8  # NVIDIA, "Convolutional Layers User's Guide": FP16 Tensor Cores want C and K % 8 == 0


@dataclass(frozen=True)
class Rounding:
    """A resolved `round_to`: the channel multiple and why it was chosen (for the log).

    Args:
        multiple: kept channel counts are multiples of this (1: no rounding).
        reason: how it was chosen, e.g. "avx512f in /proc/cpuinfo: 16 floats per register".
    """

    multiple: int
    reason: str


def check_runtime(runtime: Any) -> Runtime:
    """`runtime` as a Runtime.

    Raises:
        ValueError: not one of RUNTIMES (the message lists them).
    """
    try:
        return Runtime(runtime)
    except ValueError:
        raise ValueError(f"unknown runtime {runtime!r}; choose one of {RUNTIMES}") from None


def _cpu_flags(path: str = "/proc/cpuinfo") -> Optional[Tuple[str, ...]]:
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return tuple(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


@functools.lru_cache(maxsize=None)
def cpu_vector_floats(cpuinfo: str = "/proc/cpuinfo") -> Rounding:
    """Floats per SIMD register of this CPU, from its feature flags.

    avx512f: 16 (512-bit); avx2 or avx: 8 (256-bit); otherwise 4 (SSE or ARM NEON, 128-bit). Without
    a readable /proc/cpuinfo (macOS, Windows) the machine type decides: 4 on arm64/aarch64, 8 on
    x86-64 (every x86-64 CPU of the last decade has AVX2).
    """
    flags = _cpu_flags(cpuinfo)
    if flags is not None:
        for flag, floats in (("avx512f", 16), ("avx2", 8), ("avx", 8)):
            if flag in flags:
                return Rounding(floats, f"{flag} in {cpuinfo}: {floats} floats per vector register")
        return Rounding(4, f"no avx/avx2/avx512f in {cpuinfo}: 128-bit vectors, 4 floats")
    machine = platform.machine().lower()
    if machine in ("arm64", "aarch64"):
        return Rounding(4, f"{cpuinfo} unreadable, machine {machine}: NEON, 4 floats per register")
    return Rounding(8, f"{cpuinfo} unreadable, machine {machine or 'unknown'}: assumed AVX2, 8 floats")


def channel_multiple(runtime: Union[str, Runtime] = Runtime.PADDLE_INFERENCE,
                     cpuinfo: str = "/proc/cpuinfo") -> Rounding:
    """The channel multiple `runtime`'s convolution kernels need on this machine.

    CPU runtimes block channels by one vector register of floats (oneDNN's nChw16c/nChw8c, ONNX
    Runtime's NCHWc: `cpu_vector_floats`); GPU runtimes want multiples of 8 (Tensor Cores, FP16).

    Raises:
        ValueError: an unknown runtime.
    """
    rt = check_runtime(runtime)
    if rt.gpu:
        return Rounding(_GPU_MULTIPLE, f"{rt.value}: Tensor Core kernels want channels in multiples of "
                                       f"{_GPU_MULTIPLE} (NVIDIA's guidance; not measured here)")
    vec = cpu_vector_floats(cpuinfo)
    return Rounding(vec.multiple, f"{rt.value} on CPU blocks channels by one vector register; {vec.reason}")


def resolve_round_to(round_to: Any, runtime: Union[str, Runtime] = Runtime.PADDLE_INFERENCE,
                     log: bool = True) -> int:
    """`round_to` as an int: "auto" becomes `channel_multiple(runtime)` (logged with its reason).

    Raises:
        ValueError: neither "auto" nor an int >= 1; an unknown runtime.
    """
    if round_to == AUTO and isinstance(round_to, str):
        rounding = channel_multiple(runtime)
        key = (check_runtime(runtime).value, rounding.multiple)
        if log and key not in _LOGGED:  # once per runtime and process
            _LOGGED.add(key)
            logger.info("round_to='auto': kept channel counts are multiples of %d (%s); pass round_to=1 "
                        "to keep exact counts", rounding.multiple, rounding.reason)
        return rounding.multiple
    check_round_to(round_to)
    return int(round_to)


def check_round_to(round_to: Any) -> Union[int, str]:
    """`round_to` unchanged if it is "auto" or an int >= 1.

    Raises:
        ValueError: anything else (the message names the choices).
    """
    if isinstance(round_to, str) and round_to == AUTO:
        return round_to
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"round_to must be 'auto' (the channel multiple the runtime's kernels need) or "
                         f"an int >= 1 (1: exact channel counts), got {round_to!r}")
    return round_to


def latency_backend(runtime: Union[str, Runtime]) -> Tuple[str, bool]:
    """The latency backend and oneDNN flag that time `runtime` (see `LatencyOptions`).

    Raises:
        ValueError: a GPU runtime: its latency is not measured by this package (no GPU here).
    """
    rt = check_runtime(runtime)
    if rt.gpu:
        raise ValueError(f"runtime {rt.value!r} is a GPU runtime: its channel rounding is supported, but "
                         f"latency is measured on CPU runtimes only ('paddle_inference', 'onnxruntime')")
    return (rt.value, rt is Runtime.PADDLE_INFERENCE)


def latency_kwargs(runtime: Union[str, Runtime]) -> Dict[str, Any]:
    """`LatencyOptions` arguments that measure on `runtime` (none for a GPU runtime: not measured here).

    Raises:
        ValueError: an unknown runtime.
    """
    if check_runtime(runtime).gpu:
        return {}
    backend, onednn = latency_backend(runtime)
    return {"backend": backend, "onednn": onednn}
