import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test starts with dynamo's caches empty, so compiles in one test never leak into another."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


CPU_AND_CUDA = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.fixture(autouse=True)
def _inference_unless_marked(request):
    """Engines compute inference: tests run under no_grad, as an inference user calls, unless marked
    `grad` (those check what the wrapper does when gradients are needed)."""
    if "grad" in request.keywords:
        yield
        return
    with torch.no_grad():
        yield
