"""Comparing a deployed model with its fake-quant twin: PSNR, and the float-noise floor it is judged against."""
import torch

from questdiff.nn import QuantLayerMixin


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR of ``a`` against ``b`` (peak = ``b``'s largest magnitude), in dB."""
    peak = b.abs().max()
    return float(10 * torch.log10(peak**2 / ((a - b) ** 2).mean()))


def float_noise_floor(fake: torch.nn.Module, x: torch.Tensor, t: int, kwargs: dict, tries: int = 3,
                      eps: float = 1e-6) -> float:
    """How far one forward of the fake-quant model moves when every quantized layer's output is perturbed at float
    rounding size (x (1 + eps N(0, 1))): the lowest PSNR of ``tries`` such runs against the unperturbed output. A
    quantized model is a step function, so a deployed twin (whose kernels round in another order) can only be
    compared against this floor, not against a fixed dB."""
    with torch.no_grad():
        ref = fake(x, torch.tensor(t), **kwargs).sample
        floors = []
        for seed in range(tries):
            g = torch.Generator().manual_seed(seed)
            hooks = [m.register_forward_hook(lambda m, i, o: o * (1 + eps * torch.randn(o.shape, generator=g)))
                     for m in fake.modules() if isinstance(m, QuantLayerMixin)]
            try:
                floors.append(psnr(fake(x, torch.tensor(t), **kwargs).sample, ref))
            finally:
                for hook in hooks:
                    hook.remove()
    return min(floors)
