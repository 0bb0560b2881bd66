import pytest
import torch

from monai_qsa.utils.compile import CompiledForCPU, run_mode


def test_failed_compilation_falls_back_to_eager_once():
    module = torch.nn.Conv2d(1, 2, 3).eval()
    compiled = CompiledForCPU(module)
    calls = []

    class InductorFails(torch.nn.Module):  # what torch.compile raises when a lowering has no kernel
        def forward(self, *args):
            calls.append(1)
            raise torch._dynamo.exc.BackendCompilerFailed(
                "inductor", RuntimeError("could not create a primitive descriptor"), None
            )

    compiled._compiled = InductorFails()
    x = torch.randn(1, 1, 8, 8)
    with pytest.warns(RuntimeWarning, match="runs eagerly"):
        y = compiled(x)
    assert torch.equal(y, module(x)) and torch.equal(compiled(x), module(x))
    assert len(calls) == 1  # not retried on every call
    assert run_mode(compiled).startswith("eager (compilation failed: RuntimeError: could not create")
    assert run_mode(module) == "eager"


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
