"""Numeric precision of model passes: fp32, bf16 or fp16, and int8 matrix products on CPUs.

One place for the names ``"fp32"``, ``"bf16"``, ``"fp16"`` and ``"int8"`` used by pretraining and by
every inference function (embeddings, zero-shot annotation, retrieval).

Two mechanisms, chosen by what was measured (BENCHMARKS.md, "CPU low precision"):

- :func:`autocast` (training everywhere, and inference on CUDA): matrix products run in the
  low-precision type while softmax, LayerNorm and the losses stay in fp32; the model is untouched.
- :func:`inference_precision` (inference): on CUDA the same autocast. On a CPU, autocast casts every
  weight at every call and moves activations between fp32 and bf16 around each LayerNorm; holding the
  weights of the linear and embedding layers in bf16 for the duration of the passes instead lets the
  activations stay in bf16 from the embedding to the projection (LayerNorm keeps fp32 parameters and
  accumulates in fp32), which the CPU's AMX/AVX512-BF16 units run several times faster than fp32.
  ``"int8"`` (CPU only) swaps the linear layers of the part of the model the caller names (LangCell's
  cell side) for torch's dynamically quantised int8 layers for the passes: int8 weights with one scale
  per weight matrix, activations quantised at run time with one scale per batch, int32 products (VNNI
  or AMX-INT8 units where the CPU has them); attention and the rest stay in fp32.
  The fp32 weights are restored when the block ends, so a model is never left changed.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import LangCellError

__all__ = [
    "PRECISIONS",
    "autocast",
    "check_precision",
    "cpu_matrix_units",
    "inference_precision",
]

#: Accepted precision names.
PRECISIONS = ("fp32", "bf16", "fp16", "int8")

#: The CPU flags (as /proc/cpuinfo spells them) of units that run each low precision's matrix products
#: faster than fp32; without one of them the precision still works but is slower than fp32.
ACCELERATING_FLAGS = {
    "bf16": ("amx_bf16", "avx512_bf16"),
    "int8": ("amx_int8", "avx512_vnni", "avx_vnni"),
}


def check_precision(precision: Any, device: torch.device | None = None) -> str:
    """Return ``precision`` if it names a precision usable on ``device``, else raise :class:`LangCellError`.

    Parameters
    ----------
    precision
        ``"fp32"``, ``"bf16"`` (CPU or CUDA), ``"fp16"`` (CUDA only: CPU half precision is slow and
        inaccurate) or ``"int8"`` (CPU inference only). A CPU without units for ``bf16`` or ``int8``
        (see :func:`cpu_matrix_units`) gets a warning that the precision will be slower than fp32.
    device
        Where the model runs; ``None`` skips the device checks.
    """
    if precision not in PRECISIONS:
        raise LangCellError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if device is None:
        return precision
    if precision == "fp16" and device.type != "cuda":
        raise LangCellError(
            f"precision 'fp16' needs a CUDA device, the model is on {device.type}; use 'bf16' or 'fp32'"
        )
    if precision == "int8" and device.type != "cpu":
        raise LangCellError(
            f"precision 'int8' is for CPUs, the model is on {device.type}; use 'bf16' there (or move the model "
            "to the CPU)"
        )
    if device.type == "cpu" and precision in ACCELERATING_FLAGS:
        _warn_if_not_accelerated(precision)
    return precision


@functools.cache
def cpu_matrix_units() -> frozenset[str]:
    """The low-precision matrix units this CPU has, by their /proc/cpuinfo flag names.

    A subset of ``amx_bf16``, ``avx512_bf16``, ``amx_int8``, ``avx512_vnni``, ``avx_vnni``. Read from
    ``/proc/cpuinfo`` on Linux; elsewhere from what torch reports (``torch.cpu``'s capability checks).
    """
    wanted = {flag for flags in ACCELERATING_FLAGS.values() for flag in flags}
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(wanted & set(line.split(":", 1)[1].split()))
    found = set()
    checks = {"avx512_bf16": "_is_avx512_bf16_supported", "amx_bf16": "_is_amx_tile_supported",
              "avx512_vnni": "_is_vnni_supported"}
    for flag, name in checks.items():
        check = getattr(torch.cpu, name, None)
        with contextlib.suppress(Exception):
            if check is not None and check():
                found.add(flag)
    if "amx_bf16" in found:
        found.add("amx_int8")  # AMX tiles come with both the bf16 and the int8 instructions
    return frozenset(found)


@functools.cache
def _warn_if_not_accelerated(precision: str) -> None:
    """Warn once per process when this CPU has no unit that makes ``precision`` faster than fp32."""
    if not set(ACCELERATING_FLAGS[precision]) & cpu_matrix_units():
        warnings.warn(
            f"this CPU has none of {', '.join(ACCELERATING_FLAGS[precision])}: precision {precision!r} works "
            "but will be slower than fp32 here; use precision 'fp32'",
            UserWarning,
            stacklevel=3,
        )


def autocast(precision: str, device: torch.device):
    """A context manager running model passes on ``device`` at ``precision`` (a no-op for fp32).

    ``"int8"`` is an inference precision (:func:`inference_precision`) and is refused here.
    """
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "int8":
        raise LangCellError("precision 'int8' is for inference only; train in 'bf16' or 'fp32'")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def inference_precision(
    module: nn.Module,
    precision: str,
    device: torch.device,
    *,
    part: nn.Module | None = None,
    int8_part: nn.Module | None = None,
    bf16_weights: bool | None = None,
) -> Iterator[None]:
    """Run the inference passes of ``module`` inside the block at ``precision`` (see the module docstring).

    Parameters
    ----------
    module
        The model whose passes run in the block; its weights are as they were once the block ends
        (also after an exception). Not for training: no gradient should flow through the block.
    precision
        A name from :data:`PRECISIONS`, already checked with :func:`check_precision`.
    device
        Where ``module`` runs.
    part
        The modules of ``module`` that the passes use (default: all of it), e.g. an
        :class:`~torch.nn.ModuleList` of its cell encoder and projection: only their weights change.
    int8_part
        With ``"int8"``: the modules whose linear layers are quantised (default: ``part``); the rest runs
        in fp32. The swaps are made where the layers sit in ``module``. LangCell passes its cell side:
        quantising its text tower too changed the answers of 9-21% of the cells on the trained models,
        the cell encoder alone at most 1.5% (BENCHMARKS.md, "CPU low precision").
    bf16_weights
        With ``"bf16"``: hold the weights in bf16 (``True``) or autocast (``False``). ``None`` (default):
        bf16 weights on the CPU, where they were measured faster, autocast elsewhere (not yet measured
        against each other on a GPU; ``benchmarks/encode.py --attention`` times both).
    """
    if bf16_weights is None:
        bf16_weights = device.type == "cpu"
    if precision == "fp32":
        yield
    elif precision == "bf16" and bf16_weights:
        with _weights_in_bfloat16(module if part is None else part):
            yield
    elif precision == "int8":  # check_precision allows it on the CPU only
        quantised = next(p for p in (int8_part, part, module) if p is not None)
        with _linears_in_int8(module, {id(m) for m in quantised.modules() if type(m) is nn.Linear}):
            yield
    else:  # bf16 autocast, or fp16 (CUDA only: check_precision refuses it on the CPU)
        with autocast(precision, device):
            yield


@contextlib.contextmanager
def _weights_in_bfloat16(module: nn.Module) -> Iterator[None]:
    """Hold the parameters of every linear and embedding layer of ``module`` in bf16 inside the block."""
    originals = []
    try:
        for layer in module.modules():
            if isinstance(layer, nn.Linear | nn.Embedding):
                for parameter in layer.parameters(recurse=False):
                    if parameter.dtype == torch.float32:  # already bf16: a nested block, nothing to do
                        originals.append((parameter, parameter.data))
                        parameter.data = parameter.data.to(torch.bfloat16)
        yield
    finally:
        for parameter, data in originals:
            parameter.data = data


@contextlib.contextmanager
def _linears_in_int8(module: nn.Module, chosen: set[int]) -> Iterator[None]:
    """Replace the :class:`torch.nn.Linear` layers of ``module`` whose ``id`` is in ``chosen`` by dynamically
    quantised int8 copies inside the block.

    The copies are torch's dynamic int8 linear layers (fbgemm/oneDNN kernels: the activations are
    quantised inside the kernel with one scale per batch, the weights with one scale per matrix), which
    measured faster than an int8 product assembled from separate torch operations and than one scale per
    output feature (the per-channel kernel ran slower on the measured Xeon).
    """
    try:
        from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic
    except ImportError as error:  # a torch without the eager quantisation API
        raise LangCellError(
            f"precision 'int8' needs torch's dynamic quantisation (torch.ao.quantization), which this torch "
            f"{torch.__version__} lacks; use precision 'bf16' or 'fp32'"
        ) from error
    swapped = []
    try:
        with warnings.catch_warnings():
            # torch marks its eager quantisation API as deprecated in favour of a separate package (torchao);
            # it is what this torch ships, and the warning would repeat at every call.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings("ignore", message=".*quantize_per.*deprecated", category=UserWarning)
            for parent in list(module.modules()):
                for name, child in list(parent.named_children()):
                    if type(child) is nn.Linear and id(child) in chosen:
                        quantised = quantize_dynamic(
                            nn.Sequential(child), {nn.Linear: default_dynamic_qconfig}, dtype=torch.qint8
                        )[0]
                        setattr(parent, name, quantised)
                        swapped.append((parent, name, child))
        yield
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)
