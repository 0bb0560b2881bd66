import pytest
import torch

from monai_qsa.networks.nets import SAUNet
from monai_qsa.utils.compile import CompiledForCPU, compile_for_cpu, run_mode


class InductorFails(torch.nn.Module):
    """Raises what torch.compile raises when a lowering has no kernel, and counts its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, *args):
        self.calls += 1
        raise torch._dynamo.exc.BackendCompilerFailed(
            "inductor", RuntimeError("could not create a primitive descriptor"), None
        )


def test_failed_compilation_falls_back_to_eager_once():
    module = torch.nn.Conv2d(1, 2, 3).eval()
    compiled = CompiledForCPU(module, dynamic=False)
    compiled._compiled = failing = InductorFails()
    x = torch.randn(1, 1, 8, 8)
    with pytest.warns(RuntimeWarning, match="runs eagerly"):
        y = compiled(x)
    assert torch.equal(y, module(x)) and torch.equal(compiled(x), module(x))
    assert failing.calls == 1  # not retried on every call
    assert run_mode(compiled).startswith("eager (compilation failed: RuntimeError: could not create")
    assert run_mode(module) == "eager"


def test_failed_dynamic_compilation_compiles_per_shape_instead():
    module = torch.nn.Conv2d(1, 2, 3).eval()
    compiled = CompiledForCPU(module)  # dynamic=None: dynamic shapes from the second input size on
    compiled._compiled = failing = InductorFails()
    x = torch.randn(1, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), module(x))
    assert failing.calls == 1 and compiled.dynamic is False
    assert run_mode(compiled) == "compiled"


def test_3d_saunet_with_a_strided_stem_stays_compiled_across_input_sizes():
    """Whole volumes differ in size. Dynamo makes each axis dynamic once its size has changed, and Inductor fails to
    lower a 3D SAUNet with a strided stem once all three are (PyTorch 2.13: a convolution's stride computation; here
    at the third size); the network must go on running compiled (once per size), not eagerly, and compute what it
    computes eagerly."""
    torch.manual_seed(0)
    net = SAUNet(3, 1, 2, preset="s2_light", kernel_size=3, features=(4, 8, 16), num_heads=1).eval()
    compiled = compile_for_cpu(net)
    with torch.no_grad():
        for size in ((16, 16, 16), (12, 16, 8), (8, 8, 8)):
            x = torch.randn(1, 1, *size)
            torch.testing.assert_close(compiled(x), net(x), rtol=1e-4, atol=1e-4)
    assert run_mode(compiled) == "compiled"


def test_many_loaded_models_all_run_compiled():
    """Every int8 model is an ``InferenceGraph`` around a graph module of a class of its own, and Dynamo keeps at most
    8 graphs per Python function by default: a process's ninth model would silently run eagerly."""

    class Wrapper(torch.nn.Module):  # as InferenceGraph
        def __init__(self, program: torch.nn.Module) -> None:
            super().__init__()
            self.program = program

        def forward(self, x):
            self.compiled_call = torch.compiler.is_compiling()
            return self.program(x)

    x = torch.randn(4)
    for i in range(10):
        program = type(f"Program{i}", (torch.nn.Module,), {"forward": lambda self, x: 2 * x})()  # as GraphModule
        module = Wrapper(program)
        assert torch.equal(CompiledForCPU(module)(x), 2 * x)
        assert module.compiled_call, f"model {i + 1} ran eagerly"
