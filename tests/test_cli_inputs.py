"""Every bad input of issue 17 through the command line: exit code 2 and one line ``questdiff <cmd>: error: ...``
that names the option, before any long work (calibration, quantization, sampling are booby-trapped), with no
``--out`` folder left behind. Plus the faults (full disk, Ctrl-C, a broken subpackage) and the fast start."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

import questdiff.api
import questdiff.calibration
import questdiff.eval.sampling
from questdiff import cli, zoo
from questdiff.calibration import CalibrationSet

from builders import ddim_pipeline

pytestmark = pytest.mark.skipif(not zoo.has_default(), reason="the default zoo model is not shipped")
NO_GPU = not torch.cuda.is_available()


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    (root / "prompts.txt").write_text("a photo of a shirt\n")
    (root / "folder").mkdir()
    broken = root / "broken"  # a checkpoint whose questdiff.json misses its keys
    broken.mkdir()
    (broken / "questdiff.json").write_text(json.dumps({"format": "questdiff", "format_version": 1}))
    ddim_pipeline().save_pretrained(root / "uncond")  # unconditional: no guidance, no prompts
    for name, files in {"deployed": ["questdiff-deployed.json"], "saved": ["questdiff.json"],  # (issue 20 item 3)
                        "mixed": ["questdiff.json", "questdiff-deployed.json"], "samples/images": ["notes.txt"]}.items():
        (root / name).mkdir(parents=True)
        for file in files:
            (root / name / file).write_text("{}")
    return root


def _calibration(dtype: torch.dtype = torch.float32, channels: int = 4) -> CalibrationSet:
    """Calibration rows shaped for the default zoo UNet (4 x 8 x 8 latents, 128-wide class token)."""
    return CalibrationSet(
        {"sample": torch.randn(2, channels, 8, 8, dtype=dtype), "timestep": torch.tensor([951.0, 951.0]),
         "encoder_hidden_states": torch.randn(2, 1, 128, dtype=dtype)},
        torch.zeros(2, dtype=torch.long), "sample", "timestep", {"return_dict": False},
    )


# (argv, text the one-line message must contain); {paths}/{out} are filled in per test
CASES = [
    # 1. validated before any work
    (["quantize", "--preset", "W1A8"], "--preset 'W1A8'"),
    (["quantize", "--preset", "X9"], "--preset 'X9'"),
    (["quantize", "--preset", "W4A4", "--rotate", "48"], "--rotate 48: ActivationSpec.rotation must be a power of two"),
    (["quantize", "--rotate", "0"], "argument --rotate: must be >= 1, got 0"),
    (["quantize", "--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    (["quantize", "--calib-steps", "0"], "argument --calib-steps: must be >= 1, got 0"),
    (["quantize", "--calib-steps", "-1"], "argument --calib-steps: must be >= 1, got -1"),
    (["quantize", "--calib-steps", "50"], "--calib-steps 50 is more than the sampler's 20 steps"),
    (["quantize", "--steps", "5", "--calib-steps", "20"], "--calib-steps 20 is more than the sampler's 5 steps (--steps)"),
    (["quantize", "--guidance", "nan"], "argument --guidance: must be a finite number, got 'nan'"),
    (["quantize", "--guidance", "inf"], "argument --guidance: must be a finite number"),
    (["quantize", "--prompts", "{paths}/prompts.txt"], "--prompts does not apply: ClassConditionalLDMPipeline is class-conditional"),
    (["quantize", "--model", "{paths}/uncond", "--guidance", "3"], "--guidance does not apply"),
    (["quantize", "--out", ""], "argument --out: must name a folder"),
    (["quantize", "--calib-samples", "0"], "argument --calib-samples: must be >= 1"),
    (["quantize", "--samples-per-step", "0"], "argument --samples-per-step: must be >= 1"),
    (["quantize", "--steps", "0"], "argument --steps: must be >= 1"),
    (["quantize", "--recon-iters", "-5", "--method", "quest"], "argument --recon-iters: must be >= 0"),
    (["quantize", "--batch-size", "two"], "argument --batch-size: expected an integer, got 'two'"),
    (["quantize", "--method", "rtn", "--tla-epochs", "3"], "--tla-epochs does not apply to method 'rtn'"),
    (["quantize", "--method", "best"], "argument --method: invalid choice: 'best'"),
    (["quantize", "--model", "{paths}/missing"], "--model '{paths}/missing' is neither a pipeline folder"),
    (["quantize", "--out", "{paths}/prompts.txt/o"], "not writable"),
    (["quantize", "--model", "fmnist-features"], "--model 'fmnist-features' is neither a pipeline folder"),
    # 2. faults that were raw tracebacks
    pytest.param(["quantize", "--device", "cuda"], "--device 'cuda': no CUDA device is available here",
                 marks=pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU")),
    (["quantize", "--device", "gpu0"], "--device 'gpu0' is not a torch device"),
    (["quantize", "--prompts", "{paths}/missing.txt"], "--prompts {paths}/missing.txt: no such prompts file"),
    (["quantize", "--prompts", "{paths}/folder"], "--prompts {paths}/folder is a folder; pass the prompts file"),
    (["sample", "--quantized", "{paths}/broken"], "--quantized {paths}/broken: {paths}/broken/questdiff.json misses the entries base_fingerprint"),
    (["sample", "--quantized", "{paths}/missing"], "--quantized {paths}/missing"),
    (["sample", "--num-images", "0"], "argument --num-images: must be >= 1"),
    (["sample", "--guidance", "nan"], "argument --guidance: must be a finite number"),
    (["sample", "--prompts", "{paths}/prompts.txt"], "--prompts does not apply"),
    (["sample", "--scheduler", "heun"], "argument --scheduler: invalid choice: 'heun'"),
    pytest.param(["sample", "--device", "cuda"], "--device 'cuda'",
                 marks=pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU")),
    (["eval", "--num-samples", "5"], "--num-samples must be >= 10"),
    (["eval", "--batch-size", "0"], "argument --batch-size: must be >= 1"),
    (["eval", "--model", "nope"], "--model: unknown zoo model 'nope'"),
    (["eval", "--quantized", "{paths}/broken"], "--quantized {paths}/broken: {paths}/broken/questdiff.json misses the entries base_fingerprint"),
    (["eval", "--device", "tpu"], "--device 'tpu'"),
    (["eval", "--data", "{paths}/missing"], "--data {paths}/missing: no such folder"),
    # 3. issue 20: one kind of checkpoint per folder, no stale results, full-chain step counts
    (["quantize", "--out", "{paths}/deployed"], "--out {paths}/deployed: holds a deployed checkpoint (questdiff-deployed.json"),
    (["quantize", "--out", "{paths}/saved"], "--out {paths}/saved: holds a quantized model that no questdiff quantize run"),
    (["sample", "--quantized", "{paths}/mixed"], "--quantized {paths}/mixed: holds both a fake-quant and a deployed checkpoint"),
    (["sample", "--out", "{paths}/samples"], "--out {paths}/samples: its images/ holds files that questdiff sample did not "
                                             "write (notes.txt)"),
    (["sample", "--steps", "1001"], "--steps 1001 is more than the 1000 timesteps ClassConditionalLDMPipeline's scheduler"),
    (["quantize", "--steps", "1001"], "--steps 1001 is more than the 1000 timesteps"),
    (["sample", "--scheduler", "dpm++", "--steps", "1000"], "--steps 1000: the DPMSolverMultistepScheduler repeats timesteps"),
    (["zoo", "train", "mnist-ddpm", "--out", ""], "argument --out: must name a folder"),
    (["zoo", "train", "mnist-ddpm", "--out", "{out}", "--steps", "0"], "argument --steps: must be >= 1"),
    (["zoo", "eval", "mnist-ddpm", "--model", "{paths}/folder", "--num-samples", "0"], "argument --num-samples: must be >= 1"),
]


@pytest.fixture
def no_long_work(monkeypatch):
    """Calibration, quantization and sampling fail the test if a bad input reaches them."""
    def trap(*args, **kwargs):
        raise AssertionError("long work started before the input was checked")

    monkeypatch.setattr(questdiff.calibration, "collect_calibration", trap)
    monkeypatch.setattr(questdiff.api, "quantize", trap)
    monkeypatch.setattr(questdiff.eval.sampling, "generate", trap)


def _main(argv, capsys):
    try:
        code = cli.main(argv)
    except SystemExit as exit_:  # argparse errors
        code = exit_.code
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("argv, expected", CASES)
def test_bad_input_gives_exit_2_and_one_line_naming_the_option(argv, expected, paths, tmp_path, capsys, no_long_work):
    out = tmp_path / "out"
    fill = {"paths": str(paths), "out": str(out)}
    argv = [a.format(**fill) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(out)]
    code, err = _main(argv, capsys)
    lines = [line for line in err.splitlines() if not line.startswith("Loading pipeline")]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith(f"questdiff {argv[0]}"), err
    assert ": error: " in lines[0] and expected.format(**fill) in lines[0], err
    assert not out.exists()  # nothing left behind


@pytest.mark.parametrize("calib, expected", [
    (_calibration(channels=3), "calibration samples have 3 channels but the model expects 4"),
    (_calibration(dtype=torch.float16), "does not fit this model"),
])
def test_calibration_in_out_from_another_model_is_refused(calib, expected, tmp_path, capsys, no_long_work):
    calib.save(tmp_path / "calibration.safetensors")
    code, err = _main(["quantize", "--out", str(tmp_path)], capsys)
    line = err.splitlines()[-1]
    assert code == 2 and expected in line and "pass --recollect" in line, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calibration.safetensors"]


# what `questdiff quantize` with no collection option records for the default zoo model (20 DDIM steps, CFG 3.0)
DEFAULT_COLLECTION = {"calib-samples": 64, "calib-steps": None, "samples-per-step": None, "steps": 20, "guidance": 3.0,
                      "seed": 0, "prompts": None}


@pytest.mark.parametrize("options, expected", [
    ([], None),  # the same options: the data is reused (and the run goes on to quantize)
    (["--steps", "20", "--guidance", "3"], None),  # the pipeline's defaults, given explicitly
    (["--calib-samples", "8"], "--calib-samples: {path} was collected with --calib-samples 64, this run asks for "
                               "--calib-samples 8"),
    (["--steps", "10"], "--steps: {path} was collected with --steps 20, this run asks for --steps 10"),
    (["--guidance", "1.5"], "--guidance: {path} was collected with --guidance 3.0, this run asks for --guidance 1.5"),
    (["--seed", "1"], "--seed: {path} was collected with --seed 0, this run asks for --seed 1"),
    (["--calib-steps", "5"], "--calib-steps: {path} was collected with no --calib-steps, this run asks for --calib-steps 5"),
    (["--samples-per-step", "2"], "--samples-per-step: {path} was collected with no --samples-per-step"),
])
def test_calibration_in_out_collected_with_other_options_is_refused(options, expected, tmp_path, capsys, no_long_work):
    """Issue 20 item 1: a rerun into an ``--out`` whose calibration data was collected with other options is refused
    naming the option, before any work, and nothing in ``--out`` changes."""
    path = tmp_path / "calibration.safetensors"
    _calibration().save(path, DEFAULT_COLLECTION)
    before = path.read_bytes()
    code, err = _main(["quantize", *options, "--out", str(tmp_path)], capsys)
    if expected is None:  # accepted: the run goes on to quantization (booby-trapped)
        assert code == 1 and "long work started before the input was checked" in err, err
        return
    line = err.splitlines()[-1]
    assert code == 2 and line.startswith("questdiff quantize: error: ") and expected.format(path=path) in line, err
    assert line.endswith("; pass --recollect to sample new calibration data, or use another --out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calibration.safetensors"] and path.read_bytes() == before


def test_other_calibration_data_is_refused_where_stages_were_computed_from_it(tmp_path, capsys, no_long_work):
    """Where finished stages (or a finished run's record) were computed from ``--out``'s calibration data, new data
    would orphan them: ``--recollect`` is refused before any work, and a mismatch names another ``--out`` as the
    fix instead of ``--recollect``."""
    path = tmp_path / "calibration.safetensors"
    _calibration().save(path, DEFAULT_COLLECTION)
    (tmp_path / "work" / "stages").mkdir(parents=True)
    (tmp_path / "work" / "stages" / "finished.json").write_text("{}")
    before = path.read_bytes()
    code, err = _main(["quantize", "--recollect", "--out", str(tmp_path)], capsys)
    assert code == 2 and err.splitlines()[-1] == (
        f"questdiff quantize: error: --recollect: {tmp_path} holds stages computed from its calibration data, which "
        f"new data would not match; use another --out, or delete {tmp_path} to start over")
    code, err = _main(["quantize", "--seed", "3", "--out", str(tmp_path)], capsys)
    assert code == 2 and err.splitlines()[-1].endswith(
        f"; use another --out, or delete {tmp_path} to start over (its stages were computed from that data)")
    assert path.read_bytes() == before


def test_full_disk_is_one_line_and_leaves_no_folder(paths, tmp_path, capsys, monkeypatch):
    from safetensors import SafetensorError

    def full(*args, **kwargs):  # what safetensors raises when the disk fills up (os error 28)
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')

    monkeypatch.setattr(questdiff.calibration, "collect_calibration", lambda *a, **k: _calibration())
    monkeypatch.setattr(questdiff.calibration.data, "save_file", full)
    out = tmp_path / "out"
    code, err = _main(["quantize", "--out", str(out)], capsys)
    assert code == 2 and err.splitlines()[-1] == (
        "questdiff quantize: error: the disk is full; free some space or choose another --out folder")
    assert not out.exists()


def test_ctrl_c_says_what_was_kept_and_how_to_resume(tmp_path, capsys, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(questdiff.calibration, "collect_calibration", interrupt)
    out = tmp_path / "fresh"
    code, err = _main(["quantize", "--out", str(out)], capsys)
    assert code == 130 and err.endswith("questdiff quantize: interrupted: nothing had finished yet, nothing was kept")
    assert not out.exists()

    _calibration().save(tmp_path / "calibration.safetensors")  # a run killed after its first stage
    (tmp_path / "work" / "stages").mkdir(parents=True)
    (tmp_path / "work" / "stages" / "00-weight_init.json").write_text("{}")
    monkeypatch.setattr(questdiff.api, "quantize", interrupt)
    code, err = _main(["quantize", "--out", str(tmp_path)], capsys)
    assert code == 130 and err.endswith(
        f"kept calibration data and 1 finished stage(s) (weight_init) in {tmp_path}; run the same command again to "
        "resume from there")


def test_sigterm_cleans_up_like_ctrl_c(tmp_path, capsys, monkeypatch):
    """``timeout`` and job schedulers stop a command with SIGTERM: the same clean-up and message as Ctrl-C, and the
    previous SIGTERM handler back afterwards."""
    import os
    import signal

    monkeypatch.setattr(questdiff.calibration, "collect_calibration",
                        lambda *a, **k: os.kill(os.getpid(), signal.SIGTERM) or time.sleep(5))
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "fresh"
    code, err = _main(["quantize", "--out", str(out)], capsys)
    assert code == 130 and err.endswith("questdiff quantize: interrupted: nothing had finished yet, nothing was kept")
    assert not out.exists() and signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize("broken", [None, "no register"])
def test_a_broken_subpackage_fails_loudly(broken, monkeypatch):
    """Issue 12 item 13: a subcommand module that cannot be imported (or has no ``register``) is an error, not a
    command that silently vanishes from ``--help``."""
    module = None if broken is None else type(sys)("questdiff.zoo.cli")
    monkeypatch.setitem(sys.modules, "questdiff.zoo.cli", module)
    with pytest.raises(ImportError if broken is None else AttributeError):
        cli.build_parser()


def _every_parser(parser):
    import argparse

    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                sub.format_help()  # adds the options of a parser built on first use
                yield from _every_parser(sub)


def test_help_shows_every_default():
    import argparse

    parsers = list(_every_parser(cli.build_parser()))
    assert {p.prog for p in parsers} >= {"questdiff quantize", "questdiff sample", "questdiff eval", "questdiff zoo train"}
    for parser in parsers:
        for action in parser._actions:
            if action.option_strings and not isinstance(action, (argparse._HelpAction, argparse._StoreTrueAction)) \
                    and not action.required:
                shown = parser.formatter_class(parser.prog)._get_help_string(action) or ""
                assert "default" in shown, f"{parser.prog} {action.option_strings[0]}: {shown!r}"


HEAVY = ("torchmetrics", "transformers", "matplotlib", "scipy", "questdiff.zoo.train", "questdiff.eval.generative",
         "questdiff.calibration")


@pytest.mark.parametrize("code", [
    "import questdiff",
    "from questdiff.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass",
    "from questdiff.cli import main\nmain(['zoo', 'list'])",
])
def test_fast_start_imports_nothing_heavy(code):
    """``import questdiff``, ``questdiff --help`` and ``questdiff zoo list`` load neither the metrics, the zoo's
    training code, transformers nor the calibration stack (which pulls in diffusers' models)."""
    probe = f"{code}\nimport sys\nprint(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_lazy_names_resolve():
    import questdiff
    import questdiff.eval

    for package in (questdiff, questdiff.eval, zoo):
        for name in package.__all__:
            assert getattr(package, name) is not None, f"{package.__name__}.{name}"


def test_rotate_reaches_the_config():
    config = cli._preset("W4A4", 64)
    assert config.activation.rotation == 64 and not config.activation.per_channel and config.weight.bits == 4
    assert cli._preset("W4A4").activation.rotation is None
