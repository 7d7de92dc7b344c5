"""DeContext protection on the tiny offline Kontext model (CPU)."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch

pytest.importorskip("diffusers")

from helpers import HostReads, needs_triton_on_cpu

from ditflow.methods.decontext import ProtectConfig, Protector, protect
from ditflow.tiny import tiny_flux_pipeline

TINY_BLOCKS = ("double.0", "double.1", "single.0", "single.1")


def tiny_config(**overrides) -> ProtectConfig:
    settings = dict(steps=4, resolution=16, blocks=TINY_BLOCKS, max_sequence_length=8,
                    eval_prompts=2)
    return ProtectConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def pipe():
    return tiny_flux_pipeline("kontext")


def test_config_checks_units_and_ranges():
    with pytest.raises(ValueError, match="epsilon=300"):
        ProtectConfig(epsilon=300)
    with pytest.raises(ValueError, match="method='pgd'"):
        ProtectConfig(method="pgd")
    with pytest.raises(ValueError, match="timesteps"):
        ProtectConfig(timesteps=(990, 980))
    with pytest.raises(ValueError, match="eot_jpeg_quality"):
        ProtectConfig(eot_jpeg_quality=(0, 50))
    with pytest.raises(ValueError, match="eval_prompts=0"):
        ProtectConfig(eval_prompts=0)
    with pytest.raises(ValueError, match=r"blocks='single\.1': expected a sequence of names"):
        ProtectConfig(blocks="single.1")
    # one instruction as a string was a pool of its characters
    with pytest.raises(ValueError, match=r"prompts='Make it red': expected a sequence of "
                                         "instructions"):
        ProtectConfig(prompts="Make it red")
    with pytest.raises(ValueError, match=r"compile_backend=True: expected a torch\.compile"):
        ProtectConfig(compile_backend=True)


def test_steps_default_to_the_authors_for_each_method():
    assert ProtectConfig().steps == 800 and ProtectConfig(method="diff-pgd").steps == 600
    assert ProtectConfig(method="diff-pgd", steps=5).steps == 5


def test_unknown_blocks_are_refused(pipe):
    with pytest.raises(ValueError, match=r"\['single\.30'\] not in this model"):
        Protector(pipe, tiny_config(blocks=("single.30",)))


def test_photos_outside_the_unit_range_or_layout_are_refused_by_name(pipe):
    photo = torch.linspace(0, 1, 3 * 16 * 16).reshape(3, 16, 16)
    for bad, message in ((photo * 255, "values from 0 to 255"),
                         ((photo * 255).byte(), "dtype torch.uint8"),
                         (photo.permute(1, 2, 0), r"shape \(16, 16, 3\)")):
        with pytest.raises(ValueError, match=f"photo 'photo0': .*{message}"):
            protect([bad], pipe, tiny_config(steps=1))


def test_pil_photos_are_protected_as_their_pixels(pipe):
    from PIL import Image

    from ditflow.io import pixels_tensor

    image = Image.fromarray((torch.rand(16, 20, 3) * 255).byte().numpy())
    (from_pil,) = protect([image], pipe, tiny_config(steps=2))
    (from_tensor,) = protect([pixels_tensor(image)], pipe, tiny_config(steps=2))
    assert torch.equal(from_pil.image, from_tensor.image)


def test_a_text_to_image_pipeline_is_refused():
    with pytest.raises(TypeError, match="FluxPipeline is not an in-context editor"):
        Protector(tiny_flux_pipeline("t2i"), tiny_config())


@pytest.mark.parametrize("method", ["decontext", "diff-pgd"])
def test_gradient_checkpointing_protects_as_without_it(pipe, method):
    # the backward recomputes checkpointed blocks: through ditflow's processors, still attached
    photos = [torch.rand(3, 16, 16)]
    config = tiny_config(steps=2, method=method, diffpgd_edits=1, diffpgd_edit_steps=1)
    (plain,) = protect(photos, pipe, config)
    (checkpointed,) = protect(photos, pipe, replace(config, gradient_checkpointing=True))
    assert torch.equal(plain.image, checkpointed.image)
    assert plain.r_ctx_after == checkpointed.r_ctx_after


def test_compiled_blocks_protect_as_eager_and_are_undone_afterwards(pipe):
    # aot_eager: Dynamo's graphs and AOT autograd without Inductor's code generation
    from torch._dynamo.utils import counters

    photos = [torch.rand(3, 16, 16)]
    (eager,) = protect(photos, pipe, tiny_config(steps=2))
    torch.compiler.reset()
    counters.clear()
    (compiled,) = protect(photos, pipe, tiny_config(steps=2, compile_backend="aot_eager"))
    assert counters["stats"]["unique_graphs"] > 0
    torch.testing.assert_close(compiled.image, eager.image, atol=1 / 255, rtol=0)
    assert compiled.r_ctx_after == pytest.approx(eager.r_ctx_after, abs=1e-4)
    assert all(m._compiled_call_impl is None for m in pipe.transformer.modules())


def test_compiling_a_transformer_without_repeated_blocks_is_refused(pipe, monkeypatch):
    monkeypatch.setattr(type(pipe.transformer), "_repeated_blocks", [])
    with pytest.raises(ValueError, match="FluxTransformer2DModel names no repeated blocks"):
        protect([torch.rand(3, 16, 16)], pipe, tiny_config(steps=1, compile_backend="inductor"))


@needs_triton_on_cpu
def test_a_pgd_step_waits_for_nothing_on_the_device(pipe, monkeypatch):
    """Once the layout is planned, a PGD step's forward and backward read nothing back from
    the device, and what it makes from host data (the timesteps) goes through copy_to_device:
    on a GPU the host can then queue a step while the last one runs."""
    from ditflow.methods import decontext

    monkeypatch.setenv("DITFLOW_BACKEND", "triton")
    protector = Protector(pipe, tiny_config(blocks=("double.0",)))  # one block interpreted
    photos = torch.rand(2, 3, 16, 16)
    prompts, timesteps, noise, _, _ = protector._draw(
        [torch.Generator().manual_seed(i) for i in range(2)], photos)  # CPU generators
    reads = HostReads()
    copy = decontext.copy_to_device

    def staged(host, device, **kwargs):
        assert reads.ops[-1:] == ["aten.lift_fresh"]  # the host tensor, made just before
        reads.ops.pop()
        return copy(host, device, **kwargs)

    def step():
        x = photos.clone().requires_grad_()
        with protector.attached_r_ctx(x, prompts, timesteps, noise) as r_ctx:
            return torch.autograd.grad(r_ctx.sum(), x)[0]

    with decontext._frozen(pipe.transformer, pipe.vae):
        step()  # plans the layout and the tiles
        monkeypatch.setattr(decontext, "copy_to_device", staged)
        with reads:
            step()
    assert reads.ops == []


def test_a_pgd_step_does_not_walk_the_model(pipe, monkeypatch):
    """diffusers finds a model's device and dtype by walking its modules (a few milliseconds
    for FLUX.1's, per read): a step reads them from its editor calls, which read them once."""
    from ditflow.methods.decontext import _frozen

    protector = Protector(pipe, tiny_config(blocks=("double.0",)))
    photos = torch.rand(1, 3, 16, 16)
    prompts, timesteps, noise, _, _ = protector._draw([torch.Generator().manual_seed(0)], photos)
    walks = []
    named_modules = torch.nn.Module.named_modules

    def counted(module, *args, **kwargs):
        walks.append(type(module).__name__)
        return named_modules(module, *args, **kwargs)

    def step():
        x = photos.clone().requires_grad_()
        with protector.attached_r_ctx(x, prompts, timesteps, noise) as r_ctx:
            return torch.autograd.grad(r_ctx.sum(), x)[0]

    with _frozen(pipe.transformer, pipe.vae):
        step()  # the prompt's embeddings, computed once
        monkeypatch.setattr(torch.nn.Module, "named_modules", counted)
        step()
    assert walks == []


def test_the_pgd_loop_picks_its_photos_by_an_index_made_once(pipe):
    """The loop's own indexing of the photos still optimised waits for nothing: a list index
    would be made on the host (and copied to the device, blocking) in every step."""
    import traceback

    class LoopReads(HostReads):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            flagged = len(self.ops)
            out = super().__torch_dispatch__(func, types, args, kwargs)
            if len(self.ops) > flagged:  # where: the innermost function of ditflow's
                frames = [f.name for f in traceback.extract_stack() if "/ditflow/" in f.filename]
                self.ops[-1] = (self.ops[-1], frames[-1])
            return out

    reads = LoopReads()
    with reads:
        protect([torch.rand(3, 16, 16)] * 2, pipe,
                tiny_config(steps=3, blocks=("double.0",), batch_size=2))
    assert [op for op, where in reads.ops if where == "run"] == ["aten.lift_fresh"]  # the index


def test_cuda_graph_is_refused_where_it_cannot_hold(pipe):
    from ditflow.methods.decontext import UnsupportedSetting
    from ditflow.tiny import tiny_qwen_edit_pipeline, tiny_step1x_edit_pipeline

    for clash, match in ((dict(method="diff-pgd"), "DeContext steps only"),
                         (dict(eot_jpeg_quality=(60, 90)), "not with eot_jpeg_quality"),
                         (dict(eot_resize=(0.5, 1.0)), "not with eot_jpeg_quality")):
        with pytest.raises(ValueError, match=f"cuda_graph: {match}"):
            tiny_config(cuda_graph=True, **clash)
    with pytest.raises(UnsupportedSetting, match="the model is on cpu"):
        Protector(pipe, tiny_config(cuda_graph=True))
    # instructions embedded to their own lengths, whatever the device
    with pytest.raises(UnsupportedSetting, match="not for QwenImageTransformer2DModel"):
        Protector(tiny_qwen_edit_pipeline(), ProtectConfig(cuda_graph=True, resolution=32,
                                                           blocks=("double.0",)))
    with pytest.raises(UnsupportedSetting, match="the model is on cpu"):  # Step1X-Edit's are not
        Protector(tiny_step1x_edit_pipeline(), ProtectConfig(cuda_graph=True, resolution=32,
                                                             blocks=("single.0",)))


@pytest.mark.parametrize("editor", ["kontext", "step1x"])
def test_the_graphed_step_reads_each_step_from_its_own_inputs(pipe, editor):
    """What a CUDA graph replays reads every per-step input from the graph's own tensors,
    which each step fills: staged with one step's draws and filled with another's, it gives
    the other's eager gradient (checked here without the graph, which needs a GPU). Step1X-Edit
    embeds each instruction with the photo, to 640 tokens and a padding mask."""
    from ditflow.methods.decontext import _frozen
    from ditflow.methods.step_graph import GraphedGradient
    from ditflow.tiny import tiny_step1x_edit_pipeline

    if editor == "step1x":
        pipe = tiny_step1x_edit_pipeline()
        protector = Protector(pipe, ProtectConfig(steps=4, resolution=16, blocks=("single.0",)))
    else:
        protector = Protector(pipe, tiny_config())
    photos = torch.rand(2, 3, 16, 16)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    graphed = GraphedGradient(protector)

    def parts(x, prompts, timesteps, noise):
        return x, protector._embeddings(x, prompts), protector._timestep(timesteps), noise

    with _frozen(pipe.transformer, pipe.vae):
        _, timesteps, noise, _, _ = protector._draw(gens, photos)
        shortest = min(protector.config.prompts, key=len)  # Step1X-Edit: the most padding
        graphed._stage(*parts(photos, [shortest] * 2, timesteps, noise))
        for step in range(3):
            prompts, timesteps, noise, _, _ = protector._draw(gens, photos)
            x = (photos + 0.01 * step).requires_grad_()
            with protector.attached_r_ctx(x, prompts, timesteps, noise) as r_ctx:
                (want,) = torch.autograd.grad(r_ctx.sum(), x)
            graphed._fill(*parts(x.detach(), prompts, timesteps, noise))
            assert torch.equal(graphed._gradient(), want)  # the same operations


@needs_triton_on_cpu
@pytest.mark.parametrize("editor", ["kontext", "step1x"])
def test_the_graphed_step_makes_nothing_from_host_data_and_reads_nothing_back(pipe, editor,
                                                                           monkeypatch):
    """What a CUDA graph captures may neither wait for the device nor copy host data to it
    (a capture fails on either): once warmed up, the graph's step does neither, with the
    Triton kernels as on a GPU and the VAE's attention routed as there. A Python scalar stored
    into a tensor (Step1X-Edit's token refiner sets its mask's first column so) is a fill
    kernel on a GPU, which a graph holds."""
    from ditflow.methods.decontext import _frozen
    from ditflow.methods.step_graph import GraphedGradient
    from ditflow.tiny import tiny_step1x_edit_pipeline

    monkeypatch.setenv("DITFLOW_BACKEND", "triton")
    if editor == "step1x":
        pipe = tiny_step1x_edit_pipeline()
        protector = Protector(pipe, ProtectConfig(steps=1, resolution=16, blocks=("single.0",)))
    else:
        protector = Protector(pipe, tiny_config(blocks=("double.0",)))
    protector.wide_vae_attention = True
    photos = torch.rand(1, 3, 16, 16)
    prompts, timesteps, noise, _, _ = protector._draw([torch.Generator().manual_seed(0)], photos)
    graphed = GraphedGradient(protector)
    with _frozen(pipe.transformer, pipe.vae):
        graphed._stage(photos, protector._embeddings(photos, prompts),
                       protector._timestep(timesteps), noise)
        graphed._gradient()  # the warm-up: plans the layout and the tiles
        reads = ScalarStoresAllowed()
        with reads:
            graphed._gradient()
    assert reads.ops == []


class ScalarStoresAllowed(HostReads):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func.overloadpacket) == "aten.lift_fresh" and args[0].dim() == 0:
            return func(*args, **(kwargs or {}))
        return super().__torch_dispatch__(func, types, args, kwargs)


def test_a_failed_capture_warns_once_and_the_run_goes_on_without_graphs(pipe, monkeypatch):
    """A step CUDA graphs cannot hold (here: a capture that raises, on the CPU) costs a warning,
    not the run: it goes on eagerly, to the eager run's result."""
    import warnings

    from ditflow.methods.step_graph import GraphedGradient

    def unsupported(*args):
        raise RuntimeError("operation not permitted when stream is capturing\nmore")

    monkeypatch.setattr(GraphedGradient, "_capture", unsupported)
    photos = [torch.rand(3, 16, 16)]
    (want,) = Protector(pipe, tiny_config(steps=3)).run(["a"], photos)
    protector = Protector(pipe, tiny_config(steps=3))
    protector._graphed = GraphedGradient(protector)  # what cuda_graph=True sets on a GPU
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (got,) = protector.run(["a"], photos)
    assert [str(w.message) for w in caught] == [
        "cuda_graph: capturing the PGD step failed (operation not permitted when stream is "
        "capturing); this run goes on without CUDA graphs"]
    assert torch.equal(got.image, want.image)


@pytest.mark.gpu
@pytest.mark.parametrize(("editor", "compile_backend"), [
    ("kontext", None), ("step1x", None), ("kontext", "aot_eager")])
def test_a_graphed_step_gives_the_eager_gradient_and_protection(editor, compile_backend):
    """Replayed from its CUDA graph, a step reads each call's photos, instruction, timestep
    and noise (and Step1X-Edit's padding mask): its gradients are the eager step's, and so is
    a protection run; also with the blocks compiled (aot_eager: Dynamo's and AOTAutograd's
    graphs, without Inductor's minutes of code generation)."""
    import warnings

    from ditflow.methods.decontext import _compiled_blocks, _frozen
    from ditflow.tiny import tiny_step1x_edit_pipeline

    if editor == "step1x":
        cuda_pipe = tiny_step1x_edit_pipeline().to("cuda")
        config = ProtectConfig(steps=3, resolution=16, blocks=("single.0",), eval_prompts=2)
    else:
        cuda_pipe = tiny_flux_pipeline("kontext").to("cuda")
        config = tiny_config(steps=3)
    config = replace(config, compile_backend=compile_backend)
    eager = Protector(cuda_pipe, config)
    graphed = Protector(cuda_pipe, replace(config, cuda_graph=True))
    photos = torch.rand(2, 3, 16, 16, device="cuda")
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    with _frozen(cuda_pipe.transformer, cuda_pipe.vae), \
            _compiled_blocks(cuda_pipe.transformer, compile_backend):
        for step in range(3):  # the first captures, the others replay
            prompts, timesteps, noise, _, _ = eager._draw(gens, photos)
            x = photos + 0.01 * step
            x_eager = x.clone().requires_grad_()
            with eager.attached_r_ctx(x_eager, prompts, timesteps, noise) as r_ctx:
                (want,) = torch.autograd.grad(r_ctx.sum(), x_eager)
            got = graphed._graphed(x, prompts, timesteps, noise).clone()
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert graphed._graphed._graph is not None  # captured, not fallen back to eager
    sample = [torch.rand(3, 20, 24), torch.rand(3, 24, 20)]
    want = protect(sample, cuda_pipe, config)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a failed capture fails the test
        got = protect(sample, cuda_pipe, replace(config, cuda_graph=True))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.image, b.image, rtol=0, atol=1e-6)
        assert a.r_ctx_after == pytest.approx(b.r_ctx_after, abs=1e-5)


def test_working_size_keeps_aspect_and_snaps(pipe):
    protector = Protector(pipe, tiny_config(resolution=32))
    assert protector.working_size(100, 200) == (22, 46)  # multiples of 2 for the tiny VAE
    assert protector.working_size(64, 64) == (32, 32)


def test_protection_lowers_r_ctx_within_the_exact_budget(pipe):
    photos = [torch.rand(3, 30, 44), torch.rand(3, 40, 40)]
    results = protect(photos, pipe, tiny_config(steps=20))
    for photo, result in zip(photos, results, strict=True):
        assert result.image.shape == photo.shape  # back at the photo's own resolution
        assert (result.image - photo).abs().max() <= 12.75 / 255 + 1e-6
        assert result.image.min() >= 0 and result.image.max() <= 1
        assert result.r_ctx_after < result.r_ctx_before
        assert result.steps == 20


def test_deterministic_and_independent_of_batching(pipe):
    photos = [torch.rand(3, 24, 24), torch.rand(3, 24, 24)]
    alone = protect(photos, pipe, tiny_config(batch_size=1))
    together = protect(photos, pipe, tiny_config(batch_size=2))
    again = protect(photos, pipe, tiny_config(batch_size=2))
    for a, b, c in zip(alone, together, again, strict=True):
        torch.testing.assert_close(a.image, b.image, atol=2e-5, rtol=0)
        assert torch.equal(b.image, c.image)


def test_each_step_draws_its_instruction_timestep_and_noise(pipe, monkeypatch):
    """Sign-PGD steps see instructions from the pool, timesteps in [980, 1000) and fresh
    target noise."""
    seen = []
    attached_r_ctx = Protector.attached_r_ctx

    def recording(self, pixels, prompts, timesteps, noise, prompt_images=None):
        if pixels.requires_grad:  # a PGD step (evaluation runs without a gradient)
            seen.append((prompts[0], timesteps[0], noise.clone()))
        return attached_r_ctx(self, pixels, prompts, timesteps, noise, prompt_images)

    monkeypatch.setattr(Protector, "attached_r_ctx", recording)
    config = tiny_config(steps=12)
    protect([torch.rand(3, 24, 24)], pipe, config)
    prompts, timesteps, noises = zip(*seen, strict=True)
    assert len(seen) == 12 and set(prompts) <= set(config.prompts) and len(set(prompts)) > 3
    assert all(980 <= t < 1000 for t in timesteps) and len(set(timesteps)) == 12
    assert all(not torch.equal(a, b) for a, b in itertools.pairwise(noises))


def test_expectation_over_transformations_changes_what_the_editor_sees(pipe):
    photo = torch.rand(3, 24, 24)
    plain = protect([photo], pipe, tiny_config())[0]
    for eot in (dict(eot_jpeg_quality=(60, 90)), dict(eot_resize=(0.5, 0.7))):
        result = protect([photo], pipe, tiny_config(**eot))[0]
        assert result.steps == 4 and not torch.equal(result.image, plain.image)
    protector = Protector(pipe, tiny_config())
    x = torch.rand(1, 3, 16, 16)
    assert (protector._transform(x, [30], []) - x).abs().max() > 1e-2
    assert (protector._transform(x, [], [0.5]) - x).abs().max() > 1e-2


def test_convergence_stop_ends_early_and_records_history(pipe):
    result = protect([torch.rand(3, 24, 24)], pipe,
                     tiny_config(steps=12, stop_window=2, stop_min_gain=10.0))[0]
    assert result.steps == 2  # no window can gain 10: stops at the first check
    assert len(result.history) == 2
    going_on = protect([torch.rand(3, 24, 24)], pipe,
                       tiny_config(steps=6, stop_window=2, stop_min_gain=-1.0))[0]
    assert going_on.steps == 6  # every window counts as progress: the schedule runs out


def test_diff_pgd_baseline_moves_within_budget(pipe):
    photo = torch.rand(3, 16, 16)
    result = protect([photo], pipe, tiny_config(method="diff-pgd", steps=2, diffpgd_edits=1,
                                               diffpgd_edit_steps=1))[0]
    change = (result.image - photo).abs().max()
    assert 0 < change <= 12.75 / 255 + 1e-6


def test_diff_pgd_steps_raise_the_denoising_error(pipe, monkeypatch):
    """One Diff-PGD step, then its loss again at the stepped photo with the step's own draws
    (clean edit, timestep, noise): the baseline maximises it."""
    calls = []
    loss_of = Protector._flow_matching_loss

    def recording(self, pixels, edits, gens, *draws):
        states = [g.get_state() for g in gens]  # the loss draws which clean edit to use
        loss = loss_of(self, pixels, edits, gens, *draws)
        calls.append((self, edits, states, draws, loss.detach()))
        return loss

    monkeypatch.setattr(Protector, "_flow_matching_loss", recording)
    photo = torch.rand(3, 16, 16)  # its own working size: the result is the stepped photo
    result = protect([photo], pipe, tiny_config(method="diff-pgd", steps=1, diffpgd_edits=2,
                                               diffpgd_edit_steps=1))[0]
    ((protector, edits, states, draws, before),) = calls
    gens = [torch.Generator().set_state(state) for state in states]
    with torch.no_grad():
        after = loss_of(protector, result.image[None], edits, gens, *draws)
    assert after > before


def test_diff_pgd_noises_the_clean_edit_as_the_scheduler_does(pipe):
    """The flow-matching loss feeds the transformer the clean edit noised to the step's
    timestep as the pipeline's own scheduler defines its forward process."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(sigmas=[0.985], mu=0.0)
    timestep = scheduler.timesteps[:1]
    protector = Protector(pipe, tiny_config(method="diff-pgd"))
    pixels = protector.at_working_size([torch.rand(3, 16, 16)])
    tokens, channels = protector._target_shape(pixels)
    edit, noise = torch.randn(1, tokens, channels), torch.randn(1, tokens, channels)
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["hidden_states"][:, :tokens]),
        with_kwargs=True)
    try:
        protector._flow_matching_loss(pixels, [edit], [torch.Generator()],
                                      [protector.config.prompts[0]], [float(timestep)], noise,
                                      pixels.unbind())
    finally:
        hook.remove()
    torch.testing.assert_close(seen[0], scheduler.scale_noise(edit, timestep, noise))


def test_gradient_matches_the_authors_recipe(pipe):
    """ditflow's step (early stop, fused mass gradient) and the authors' recipe (all blocks,
    eager probabilities, gradient checkpointing) give the same pixel gradient."""
    from benchmarks.protect_step import ditflow_step, eager_step
    from ditflow.methods.decontext import _checkpointing, _frozen

    protector = Protector(pipe, tiny_config(blocks=("single.0", "single.1")))
    pixels = torch.rand(1, 3, 16, 16)
    tokens, channels = protector._target_shape(pixels)
    noise = torch.randn(1, tokens, channels)
    step = ([protector.config.prompts[3]], [985.0], noise)
    with _frozen(pipe.transformer, pipe.vae):
        ours = ditflow_step(protector, pixels, *step)
        with _checkpointing(pipe.transformer, True):
            theirs = eager_step(protector, pixels, *step)
    assert ours.abs().max() > 0
    torch.testing.assert_close(ours, theirs, atol=1e-7, rtol=1e-4)
