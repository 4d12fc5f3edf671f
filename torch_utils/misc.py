"""Small shared helpers: cached constants, shape assertions, seeded generators, parameter copying."""

import contextlib

import numpy as np
import torch

_constant_cache: dict = {}


def constant(value, shape=None, dtype=None, device=None, memory_format=None) -> torch.Tensor:
    """A cached constant tensor (EDM's misc.constant; AugmentPipe code in EDM pickles calls it)."""
    value = np.asarray(value)
    if shape is not None:
        shape = tuple(shape)
    if dtype is None:
        dtype = torch.get_default_dtype()
    if device is None:
        device = torch.device("cpu")
    if memory_format is None:
        memory_format = torch.contiguous_format
    key = (value.shape, value.dtype, value.tobytes(), shape, dtype, device, memory_format)
    tensor = _constant_cache.get(key)
    if tensor is None:
        tensor = torch.as_tensor(value.copy(), dtype=dtype, device=device)
        if shape is not None:
            tensor, _ = torch.broadcast_tensors(tensor, torch.empty(shape))
        tensor = tensor.contiguous(memory_format=memory_format)
        _constant_cache[key] = tensor
    return tensor


def assert_shape(tensor: torch.Tensor, ref_shape) -> None:
    """Assert tensor.shape matches ref_shape, where None in ref_shape matches any size."""
    if tensor.ndim != len(ref_shape):
        raise AssertionError(f"wrong number of dimensions: got {tensor.ndim}, expected {len(ref_shape)}")
    for idx, (size, ref_size) in enumerate(zip(tensor.shape, ref_shape)):
        if ref_size is not None and size != ref_size:
            raise AssertionError(f"wrong size for dimension {idx}: got {size}, expected {ref_size}")


class StackedRandomGenerator:
    """One torch.Generator per seed, so that each sample depends only on its own seed (EDM's generate.py).

    Draws are made per seed and stacked: a sample's latent is identical at any batch position or rank count.
    """

    def __init__(self, device, seeds):
        self.device = torch.device(device)
        self.generators = [torch.Generator(self.device).manual_seed(int(seed) % (1 << 32)) for seed in seeds]

    def randn(self, size, **kwargs) -> torch.Tensor:
        if size[0] != len(self.generators):
            raise ValueError(f"batch size {size[0]} does not match the number of seeds {len(self.generators)}")
        return torch.stack([torch.randn(size[1:], generator=gen, device=self.device, **kwargs)
                            for gen in self.generators])

    def randn_like(self, input: torch.Tensor) -> torch.Tensor:
        return self.randn(input.shape, dtype=input.dtype, layout=input.layout)

    def randint(self, *args, size, **kwargs) -> torch.Tensor:
        if size[0] != len(self.generators):
            raise ValueError(f"batch size {size[0]} does not match the number of seeds {len(self.generators)}")
        return torch.stack([torch.randint(*args, size=size[1:], generator=gen, device=self.device, **kwargs)
                            for gen in self.generators])


def named_params_and_buffers(module: torch.nn.Module):
    return list(module.named_parameters()) + list(module.named_buffers())


@torch.no_grad()
def copy_params_and_buffers(src_module: torch.nn.Module, dst_module: torch.nn.Module,
                            require_all: bool = False) -> None:
    """Copy tensors by name from src to dst (EDM's --transfer/--resume semantics)."""
    src_tensors = dict(named_params_and_buffers(src_module))
    for name, tensor in named_params_and_buffers(dst_module):
        if name in src_tensors:
            tensor.copy_(src_tensors[name])
        elif require_all:
            raise KeyError(f"tensor {name!r} missing from the source module")


@contextlib.contextmanager
def ddp_sync(module: torch.nn.Module, sync: bool):
    """Skip DDP's gradient all-reduce on accumulation rounds that are not the last."""
    if isinstance(module, torch.nn.parallel.DistributedDataParallel) and not sync:
        with module.no_sync():
            yield
    else:
        yield


def nan_to_num_grads_(parameters, posinf: float = 1e5, neginf: float = -1e5) -> torch.Tensor | None:
    """Scrub non-finite gradients in place as EDM does: NaN -> 0, +inf -> 1e5, -inf -> -1e5.

    Returns a 0-dim bool tensor on the gradients' device, True when some gradient held a non-finite value before the
    scrub (None without gradients); computed from one fused norm per parameter, without a host sync. A finite
    gradient whose norm overflows float32 (about 1e19 per element) also counts: the step has diverged either way.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return None
    found = ~torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()
    for grad in grads:
        torch.nan_to_num(grad, nan=0.0, posinf=posinf, neginf=neginf, out=grad)
    return found


def stream_seed(*keys) -> int:
    """A 63-bit seed that depends only on the integer keys (e.g. the run's seed, a stream tag, rank, pool index)."""
    words = np.random.SeedSequence([int(k) % (1 << 64) for k in keys]).generate_state(2, np.uint32)
    return (int(words[0]) | (int(words[1]) << 32)) & ((1 << 63) - 1)


@torch.no_grad()
def count_nonfinite(module: torch.nn.Module) -> int:
    """Number of NaN/inf values among the module's parameters and floating-point buffers (one host sync)."""
    tensors = [t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()]
    if not tensors:
        return 0
    return int(torch.stack([(~torch.isfinite(t)).sum() for t in tensors]).sum())
