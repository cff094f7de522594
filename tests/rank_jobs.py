"""Jobs the distributed tests run on two gloo ranks (``ranks.run_ranks``) and in the test's own process, to compare:
calibration collection, one BRECQ unit, TLA + CMA steps, evaluation sampling and ``questdiff eval``."""
from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from builders import ddim_pipeline, tiny_unet2d

import questdiff as qd
from questdiff import distributed
from questdiff.calibration import BrecqConfig, CalibrationSet, CMAConfig, TLAConfig
from questdiff.calibration.activations import init_activations
from questdiff.calibration.brecq import capture, reconstruct_unit
from questdiff.calibration.cma import run_cma
from questdiff.calibration.finetune import Batch, _Forwards
from questdiff.calibration.tla import run_tla
from questdiff.calibration.weights import init_weights
from questdiff.config import preset
from questdiff.nn.adaround import AdaRoundQuantizer
from questdiff.prepare import prepare, quant_state
from questdiff.timestep import TimestepSchedule

CPU = torch.device("cpu")
LOSS = _Forwards.loss


def _count_rows(model: torch.nn.Module) -> list[int]:
    """A list that counts the rows ``model`` runs from now on (its first argument's batch sizes)."""
    count = [0]
    model.register_forward_pre_hook(lambda _m, args, kwargs: count.__setitem__(0, count[0] + (args or [*kwargs.values()])[0].shape[0]),
                                    with_kwargs=True)
    return count


def collect(**kwargs: Any) -> dict[str, Any]:
    """``collect_calibration`` of the tiny DDIM pipeline: its rows, steps and digest, and the denoiser rows this
    process ran."""
    pipe = ddim_pipeline()
    ran = _count_rows(pipe.unet)
    calib = qd.collect_calibration(pipe, progress=False, **kwargs)
    return {"inputs": calib.inputs, "steps": calib.steps, "digest": calib.digest(), "shape": calib.timestep_shape,
            "rows_run": ran[0]}


def _prepared(calib: CalibrationSet, name: str = "W4A8") -> torch.nn.Module:
    unet = tiny_unet2d()
    prepare(unet, preset(name), TimestepSchedule.from_timesteps(calib.timesteps))
    init_weights(unet)
    return unet


def brecq_unit(calib: CalibrationSet, unit_name: str, config: BrecqConfig) -> dict[str, Any]:
    """AdaRound of one unit of the tiny UNet: its captured inputs and targets, its soft ``alpha``s just before
    hardening, its losses, and the rows this process ran through the denoiser (capture) and the unit (AdaRound)."""
    unet = _prepared(calib)
    unit = unet.get_submodule(unit_name)
    rows = [torch.arange(len(calib))]
    kwargs = {"device": CPU, "batch_size": 16, "storage": CPU}
    alphas: list[torch.Tensor] = []
    harden = AdaRoundQuantizer.harden

    def spy(q: AdaRoundQuantizer) -> None:
        alphas.append(q.alpha.detach().clone())
        harden(q)

    AdaRoundQuantizer.harden = spy
    captured = _count_rows(unet)
    try:
        with quant_state(unet, weight=True, act=False):
            inputs = capture(unet, unit, calib, rows, what="input", **kwargs)
            with quant_state(unet, weight=False, act=False):
                targets = capture(unet, unit, calib, rows, what="output", **kwargs)
            ran = _count_rows(unit)
            result = reconstruct_unit(unit, inputs, targets, config, device=CPU, seed=3, name=unit_name)
    finally:
        AdaRoundQuantizer.harden = harden
    return {"alphas": alphas, "rtn_loss": result.rtn_loss, "loss": result.loss, "rows_run": ran[0],
            "rows_captured": captured[0], "inputs": inputs.leaves, "targets": targets.leaves}


def blockwise_loss(world: int) -> Callable[[Any, Batch], torch.Tensor]:
    """A ``finetune._Forwards.loss`` for one process that runs each batch as ``world`` ranks do: one forward per
    rank's block (``distributed.shard``), the block losses weighted by their share and summed. The summed gradient
    is then the one ``world`` ranks all-reduce, with the same floating-point operations."""
    loss = _Forwards.loss

    def blockwise(self: _Forwards, batch: Batch) -> torch.Tensor:
        total = None
        for r in range(world):
            index = batch.index[distributed.shard(len(batch.index), r, world)]
            if len(index):
                term = loss(self, replace(batch, index=index))
                term = term * (len(index) / len(batch.index)) if len(index) != len(batch.index) else term
                total = term if total is None else total + term
        assert total is not None
        return total

    return blockwise


def finetune(calib: CalibrationSet, tla: TLAConfig, cma: CMAConfig, blockwise: int | None = None) -> dict[str, Any]:
    """TLA then CMA on the W4A8 tiny UNet after RTN init: the per-step losses, the trained state and the denoiser
    rows this process ran. ``blockwise=N``: one process computing every batch as N ranks' blocks."""
    if blockwise is not None:
        _Forwards.loss = blockwise_loss(blockwise)
    try:
        return _finetune(calib, tla, cma)
    finally:
        _Forwards.loss = LOSS


def _finetune(calib: CalibrationSet, tla: TLAConfig, cma: CMAConfig) -> dict[str, Any]:
    unet = _prepared(calib)
    ran = _count_rows(unet)
    init_activations(unet, calib, device=CPU, progress=False)
    tla_result = run_tla(unet, calib, tla, device=CPU, progress=False, seed=1)
    cma_result = run_cma(unet, calib, cma, device=CPU, progress=False, seed=2)
    return {"tla": tla_result.losses, "cma": cma_result.losses, "state": unet.state_dict(), "rows_run": ran[0]}


def sample(**kwargs: Any) -> dict[str, Any]:
    """``eval.sampling.generate`` on the tiny DDIM pipeline: the images and the denoiser rows this process ran."""
    from questdiff.eval.sampling import generate

    pipe = ddim_pipeline()
    ran = _count_rows(pipe.unet)
    return {"images": generate(pipe, desc="test", **kwargs), "rows_run": ran[0]}


def install_tiny_zoo(feature_net: torch.nn.Module, real: torch.Tensor,
                     setattr_: Callable[[Any, str, Any], None] = setattr) -> None:
    """Stand-ins for the zoo (a tiny random class-conditional pipeline, ``feature_net``, ``real`` as the test set
    ``[N, H, W]`` uint8, and a perturbed copy of the FP denoiser as the quantized one) for ``questdiff eval``."""
    from questdiff import zoo
    from questdiff.eval import cli
    from questdiff.zoo import data as zoo_data
    from questdiff.zoo.architectures import build_class_embedder, build_cond_unet, build_scheduler, build_vae
    from questdiff.zoo.pipelines import ClassConditionalLDMPipeline

    def load(name: str, device: Any = None) -> Any:
        torch.manual_seed(0)
        pipe = ClassConditionalLDMPipeline(vae=build_vae(tiny=True), unet=build_cond_unet(tiny=True),
                                           class_embedder=build_class_embedder(tiny=True), scheduler=build_scheduler("ldm"))
        return pipe.to(device)

    def load_quantized(directory: str, base: torch.nn.Module) -> torch.nn.Module:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in base.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=g))
        return base

    setattr_(zoo, "load", load)
    setattr_(zoo, "load_feature_net", lambda name, device=None: feature_net)
    setattr_(zoo_data, "load_split", lambda name, split="train", data_dir=None: (real, torch.arange(len(real)) % 10))
    # the stand-in checkpoint has no questdiff.json
    setattr_(cli, "load_quantized", load_quantized)
    setattr_(cli, "checkpoint_label", lambda path: "stand-in")


def evaluate(feature_net: torch.nn.Module, real: torch.Tensor, argv: list[str]) -> dict[str, Any]:
    """``questdiff eval argv`` with the tiny zoo: the metrics (rank 0; ``{}`` elsewhere)."""
    from questdiff.eval import cli

    install_tiny_zoo(feature_net, real)
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return cli.evaluate(parser.parse_args(argv))


def quantize_twice(calib: CalibrationSet, work_dir: str) -> dict[str, Any]:
    """RTN through ``quantize`` with a work dir, twice (the second run resumes): the stage reports, the stage files
    this process wrote and the final state."""
    from questdiff.calibration import methods

    written: list[str] = []
    save_state = methods.save_state

    def spy(model: torch.nn.Module, path: Any) -> None:
        written.append(Path(path).name)
        save_state(model, path)

    methods.save_state = spy
    try:
        reports = []
        for _ in range(2):
            unet = tiny_unet2d()
            qd.quantize(unet, "W4A8", calib, "rtn", device="cpu", work_dir=work_dir, progress=False)
            reports.append(qd.handle(unet).extra["report"])
    finally:
        methods.save_state = save_state
    return {"reports": reports, "written": written, "state": unet.state_dict()}
