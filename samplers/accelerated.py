"""The denoiser call of batch sampling, made faster on request: bf16 autocast, torch.compile, CUDA graph replay.

Opt-in (generate.py / fid.py --precision bf16, --compile, --cuda-graph; SamplerConfig fields): the defaults call the
network as EDM does, so images stay bit-identical to EDM's generate.py. What each option does to the numbers:

- precision 'bf16': the network runs under torch.autocast(bfloat16) (the solver stays float64, the preconditioner's
  output float32). Images move by about a uint8 level here and there (benchmarks/gpu_suite.py states max/mean).
- compile: torch.compile of the network's forward (whole network, static shapes). Inductor may reorder float sums,
  so fp32 images may differ in the last bits of D (rarely a uint8 level).
- cuda_graph (CUDA only; an error elsewhere): each distinct call shape is captured once into a CUDA graph (after
  two warm-up calls on a side stream) and replayed with the new inputs copied into its static buffers: the kernels
  are the eager (or compiled) ones, without the per-kernel launch cost. Exact with respect to the same call without
  the graph.

The accelerated call is used only for the plain call `denoiser(x, sigma, class_labels)` without autograd; anything
else (extra keyword arguments, gradients: LD3, guidance) goes to the network, still under the autocast asked for.
An image still depends only on its seed for fp32 eager; with bf16 or compile, kernels chosen per batch shape may
move a pixel by a level between batch sizes.
"""

import contextlib

import torch

__all__ = ['PRECISIONS', 'AcceleratedDenoiser', 'accelerate']

PRECISIONS = ('fp32', 'bf16')


def accelerate(net, precision: str = 'fp32', compile: bool = False, cuda_graph: bool = False):
    """`net` itself for the defaults (or when it already is such a denoiser); otherwise an AcceleratedDenoiser. Keep
    the result for the whole run: its compiled code and captured graphs serve every batch."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    if isinstance(net, AcceleratedDenoiser):
        if (net.precision, net.compile, net.cuda_graph) == (precision, bool(compile), bool(cuda_graph)):
            return net
        net = net.net
    if precision == 'fp32' and not compile and not cuda_graph:
        return net
    return AcceleratedDenoiser(net, precision=precision, compile=compile, cuda_graph=cuda_graph)


class AcceleratedDenoiser:
    """Calls `net(x, sigma, class_labels)` under the chosen precision, compiled and/or replayed from CUDA graphs;
    every other attribute is the network's (img_channels, label_dim, round_sigma, sigma_min, ...)."""

    def __init__(self, net, precision: str = 'fp32', compile: bool = False, cuda_graph: bool = False):
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
        self.net = net
        self.precision = precision
        self.compile = bool(compile)
        self.cuda_graph = bool(cuda_graph)
        self._forward = torch.compile(net, dynamic=False) if compile else net
        self._graphs = {}  # call signature -> (graph, static x, static sigma, static labels, static output)

    def __getattr__(self, name):
        if name == 'net':  # not set yet (unpickling, copying): no recursion
            raise AttributeError(name)
        return getattr(self.net, name)

    def _autocast(self, device_type: str):
        if self.precision == 'fp32':
            return contextlib.nullcontext()
        # cache_enabled=False: cached weight casts must not outlive a captured graph's memory pool.
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16, cache_enabled=False)

    def _call(self, forward, x, sigma, class_labels, **kwargs):
        with self._autocast(x.device.type):
            return forward(x, sigma, class_labels, **kwargs)

    def __call__(self, x, sigma, class_labels=None, **kwargs):
        if kwargs or torch.is_grad_enabled():
            return self._call(self.net, x, sigma, class_labels, **kwargs)
        if not self.cuda_graph:
            return self._call(self._forward, x, sigma, class_labels)
        if x.device.type != 'cuda':
            raise ValueError(f'--cuda-graph (cuda_graph=True) needs a CUDA device, not {x.device}')
        return self._replay(x, sigma, class_labels)

    def _replay(self, x, sigma, class_labels):
        sigma = torch.as_tensor(sigma, device=x.device)
        key = (tuple(x.shape), x.dtype, tuple(sigma.shape), sigma.dtype,
               None if class_labels is None else (tuple(class_labels.shape), class_labels.dtype), x.device)
        if key not in self._graphs:
            self._graphs[key] = self._capture(x, sigma, class_labels)
        graph, static_x, static_sigma, static_labels, static_out = self._graphs[key]
        static_x.copy_(x)
        static_sigma.copy_(sigma)
        if static_labels is not None:
            static_labels.copy_(class_labels)
        graph.replay()
        return static_out.clone()  # the next replay overwrites static_out

    def _capture(self, x, sigma, class_labels):
        static_x, static_sigma = x.clone(), sigma.clone()
        static_labels = None if class_labels is None else class_labels.clone()
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):  # warm-up (cuDNN autotuning, compilation) outside the capture
            for _ in range(2):
                self._call(self._forward, static_x, static_sigma, static_labels)
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self._call(self._forward, static_x, static_sigma, static_labels)
        return graph, static_x, static_sigma, static_labels, static_out
