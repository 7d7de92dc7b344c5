"""DeContext's PGD step replayed from a CUDA graph.

At 512² a FLUX.1 Kontext step launches about ten thousand kernels, and the host takes longer to
launch them (Python, PyTorch's dispatch and autograd) than the GPU takes to run them: the step
is bound by the host. A CUDA graph of the step launches them all at once, so a step costs its
kernels' time. For editors whose instructions embed to one shape (FLUX.1 Kontext, Step1X-Edit;
not Qwen-Image-Edit, whose lengths differ).

The graph is captured on the first step of a batch shape, after warm-up steps that compile and
plan everything, and reads its inputs from tensors of its own, which each step fills: the
photos, the target noise, the timesteps and the instructions' embeddings. Everything else the
step reads (weights, token layout, position ids) stays put while a :class:`Protector` lives.
One graph is kept: another batch shape (a convergence stop shrinking the batch, another working
size) captures anew. Should a capture fail (an operation CUDA graphs cannot hold), the run goes
on without graphs, with a warning: a bulk job does not die of it.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch


class GraphedGradient:
    """The gradient of the summed r_ctx of a DeContext step with respect to the photos, as
    :meth:`Protector.attached_r_ctx` gives it, replayed from a CUDA graph. The gradient it
    returns is overwritten by the next call; None once a capture has failed (the caller then
    steps without the graph)."""

    warmup_steps = 2

    def __init__(self, protector):
        self.protector = protector
        self.failed = False
        self.release()

    def __call__(self, pixels: torch.Tensor, prompts: Sequence[str], timesteps: Sequence[float],
                 noise: torch.Tensor, prompt_images=None) -> torch.Tensor | None:
        if self.failed:
            return None
        embeds = self.protector._embeddings(pixels, prompts, prompt_images)
        timestep = self.protector._timestep(timesteps)
        key = (tuple(pixels.shape), tuple(noise.shape),
               tuple((name, tuple(t.shape)) for e in embeds for name, t in e.items()))
        if key != self._key:
            try:
                self._capture(key, pixels, embeds, timestep, noise)
            except RuntimeError as exc:
                self.release()
                self.failed = True
                reason = (str(exc).splitlines() or [type(exc).__name__])[0]
                warnings.warn(f"cuda_graph: capturing the PGD step failed ({reason}); this run "
                              "goes on without CUDA graphs", RuntimeWarning, stacklevel=2)
                return None
        self._fill(pixels, embeds, timestep, noise)
        self._graph.replay()
        return self._grad

    def release(self) -> None:
        """Free the graph and its memory (the next call captures anew)."""
        self._key: tuple | None = None
        self._graph: torch.cuda.CUDAGraph | None = None
        # the graph's inputs (filled by each call) and output
        self._pixels = self._noise = self._timestep = self._embeds = self._grad = None

    def _stage(self, pixels, embeds, timestep, noise) -> None:
        """The graph's inputs: tensors of its own, shaped as these."""
        self._pixels = pixels.detach().clone().requires_grad_()
        self._noise = noise.clone()
        # made as the step makes it, so the session reads its values on the host at capture
        self._timestep = timestep
        self._embeds = [{name: t.clone() for name, t in e.items()} for e in embeds]

    @torch.no_grad()
    def _fill(self, pixels, embeds, timestep, noise) -> None:
        """One step's inputs, copied into the graph's."""
        self._pixels.copy_(pixels)
        self._noise.copy_(noise)
        self._timestep.copy_(timestep)
        for static, embed in zip(self._embeds, embeds, strict=True):
            for name, tensor in embed.items():
                static[name].copy_(tensor)

    def _gradient(self) -> torch.Tensor:
        """The step, reading nothing but the graph's inputs (and what stays put)."""
        protector = self.protector
        inputs = protector._model_inputs(self._pixels, self._embeds, self._timestep, self._noise)
        with torch.enable_grad(), protector._r_ctx_of(inputs) as r_ctx:
            (grad,) = torch.autograd.grad(r_ctx.sum(), self._pixels)
        return grad

    def _capture(self, key, pixels, embeds, timestep, noise) -> None:
        self.release()  # the last graph's memory goes first
        self._stage(pixels, embeds, timestep, noise)
        # Warm-up on a side stream, as CUDA graphs ask: Triton compiles, tile plans and cuBLAS
        # workspaces are made here, not during the capture (which may not wait for the GPU).
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup_steps):
                self._gradient()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.empty_cache()  # the warm-up's blocks: the graph has a pool of its own
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._grad = self._gradient()
        self._graph, self._key = graph, key
