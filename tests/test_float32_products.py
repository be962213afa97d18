"""float32_matmul: the float32 product of the upcast inputs, for half and float32 inputs, 2-D and batched."""

import pytest
import torch

from llava.model.float32_products import float32_matmul

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batched", [False, True])
def test_equals_the_upcast_float32_product(device, dtype, batched):
    generator = torch.Generator().manual_seed(0)
    shape_a, shape_b = ((3, 40, 96), (3, 96, 24)) if batched else ((40, 96), (96, 24))
    a = torch.randn(shape_a, generator=generator).to(device, dtype)
    b = torch.randn(shape_b, generator=generator).to(device, dtype)
    out = float32_matmul(a, b)
    assert out.dtype == torch.float32 and out.shape == (*shape_a[:-1], shape_b[-1])
    reference = a.double() @ b.double()  # exact products; the float32 result differs by summation order only
    torch.testing.assert_close(out.double(), reference, rtol=0, atol=1e-4)


def test_small_integer_products_are_exact():
    a = torch.randint(-8, 8, (17, 33)).to(torch.bfloat16)
    b = torch.randint(-8, 8, (33, 5)).to(torch.bfloat16)
    assert torch.equal(float32_matmul(a, b), a.float() @ b.float())


def test_rejects_mismatched_ranks():
    with pytest.raises(ValueError, match="2-D or two 3-D"):
        float32_matmul(torch.zeros(2, 3), torch.zeros(1, 3, 2))
