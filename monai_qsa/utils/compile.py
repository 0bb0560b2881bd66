"""torch.compile settings for running SA networks (fp32 or int8) on CPUs."""

from __future__ import annotations

import logging
import os
import shutil
import warnings

import torch
from torch import nn

__all__ = [
    "compile_for_cpu",
    "CPU_COMPILE_OPTIONS",
    "RECOMPILE_LIMIT",
    "CompiledForCPU",
    "find_compiler",
    "has_cpp_compiler",
    "run_mode",
]

# Inductor's layout optimisation turns fp32 convolution outputs channels-last: the fused attention kernel then needs
# a layout pass over every projection, and the PyTorch attention path reads each head's channels with a large stride
# and vectorises badly (about 2x slower)
CPU_COMPILE_OPTIONS = {"layout_optimization": False}
#: graphs TorchDynamo may keep per Python function while one of our modules runs. Every loaded int8 model (an
#: ``InferenceGraph`` around a graph module of a class of its own) and, for int8, every input shape adds one to
#: ``InferenceGraph.forward``; past Dynamo's default of 8, a process that has loaded that many (a MONAI Label server
#: after several training rounds, a benchmark) would silently run its next models eagerly
RECOMPILE_LIMIT = 64

logger = logging.getLogger(__name__)


def find_compiler(env_var: str, names: tuple[str, ...]) -> str | None:
    """Path of the compiler named by ``$env_var``, else of the first of ``names`` on PATH; None if there is none."""
    return next((path for name in (os.environ.get(env_var), *names) if name and (path := shutil.which(name))), None)


def has_cpp_compiler() -> bool:
    """Whether Inductor's CPU backend can find a C++ compiler."""
    return find_compiler("CXX", ("g++", "c++", "clang++")) is not None


class CompiledForCPU(nn.Module):
    """A module compiled by Inductor with :data:`CPU_COMPILE_OPTIONS` in force whenever it (re)compiles.

    The options are applied as an Inductor config patch around each call rather than through
    ``torch.compile(options=...)``, because freezing, which int8 graphs need, only takes effect that way; Dynamo's
    recompile limit is raised to :data:`RECOMPILE_LIMIT` the same way.

    If Inductor fails to compile the module with dynamic shapes (``dynamic`` True, or None once input sizes vary: 3D
    SAUNets with a strided stem fail in a convolution's stride computation, PyTorch 2.13), it is compiled
    once per input shape from then on, with one warning. If it fails to compile it at all (e.g. oneDNN has no int8
    kernel for one of its convolutions), one warning is given and the module runs eagerly from then on;
    ``eager_fallback`` then holds the reason.

    Args:
        module: the module to compile; kept as ``self.module``.
        dynamic: passed to ``torch.compile``.
        freezing: constant-fold the weights of inference (no_grad) graphs. Needed to prepack PT2E int8
            weights for oneDNN; it slows fp32 SA networks (it re-enables blocked convolution layouts).
    """

    def __init__(self, module: nn.Module, dynamic: bool | None = None, freezing: bool = False) -> None:
        super().__init__()
        self.module = module
        self.options = CPU_COMPILE_OPTIONS | {"freezing": freezing}
        self.dynamic = dynamic
        self._compiled = torch.compile(module, dynamic=dynamic)
        self.eager_fallback: str | None = None
        self._announced = False

    def forward(self, *args, **kwargs):
        # MONAI MetaTensors (what loaders and inferers pass) break compiled graphs: run on their plain data
        args = tuple(a.as_tensor() if hasattr(a, "as_tensor") else a for a in args)
        if self.eager_fallback is not None:
            return self.module(*args, **kwargs)
        if not self._announced:
            self._announced = True
            logger.info(
                f"Compiling {type(self.module).__name__} for the CPU with torch.compile: the first call takes longer "
                "(about a minute for int8 graphs), later ones run compiled."
            )
        try:
            limit = torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT)
            with torch._inductor.config.patch(self.options), limit:
                return self._compiled(*args, **kwargs)
        except torch._dynamo.exc.BackendCompilerFailed as error:
            reason = next((line for line in str(error).splitlines() if "Error" in line), str(error)[:200])
            if self.dynamic is not False:
                logger.warning(
                    f"Inductor could not compile {type(self.module).__name__} with dynamic shapes ({reason}); it is "
                    "compiled once per input shape from now on."
                )
                self.dynamic = False
                self._compiled = torch.compile(self.module, dynamic=False)
                return self.forward(*args, **kwargs)  # once more, without running module hooks twice
            self.eager_fallback = reason
            warnings.warn(
                f"Inductor could not compile {type(self.module).__name__} ({self.eager_fallback}); "
                "it runs eagerly (slower) from now on.",
                RuntimeWarning,
                stacklevel=2,
            )
            return self.module(*args, **kwargs)


def compile_for_cpu(module: nn.Module, dynamic: bool | None = None, freezing: bool = False) -> nn.Module:
    """Compile ``module`` for CPU inference, or return it unchanged (with one warning) when no C++ compiler exists.

    Args:
        module: an fp32 network, or an int8 module from :func:`monai_qsa.quantization.quantize_ptq`.
        dynamic: passed to ``torch.compile``; ``None`` lets it decide after seeing a second shape (fp32), and means
            ``False`` with ``freezing`` (int8 graphs compile per input shape: Inductor's int8 convolution lowering
            fails on dynamic shapes).
        freezing: see :class:`CompiledForCPU`; True for int8 PT2E models.
    """
    if freezing and dynamic is None:
        # Inductor's int8 convolution lowering fails on dynamically shaped graphs (stride assertion in qconv):
        # compile int8 models for each input shape instead
        dynamic = False
    if not has_cpp_compiler():
        warnings.warn(
            "no C++ compiler found (set CXX or install g++): torch.compile is skipped and the model runs eagerly, "
            "which is slower, in particular for int8 models.",
            RuntimeWarning,
            stacklevel=2,
        )
        return module
    return CompiledForCPU(module, dynamic=dynamic, freezing=freezing)


def run_mode(module: nn.Module) -> str:
    """How ``module`` runs, for reports: ``"compiled"``, ``"eager"``, or eager after a failed compilation."""
    if not isinstance(module, CompiledForCPU):
        return "eager"
    return "compiled" if module.eager_fallback is None else f"eager (compilation failed: {module.eager_fallback})"
