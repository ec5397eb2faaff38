"""The examples run end to end as a user runs them: a subprocess each, on tiny offline data.

Each test parses what the example prints (the FLOPs it removed) and checks the files it wrote by
reading them back: the sensitivity JSON, the checkpoint (reloaded with load_pruned) and the
exported inference model (loaded with paddle.jit.load).
"""
from __future__ import annotations

import importlib.util
import io
import json
import pickle
import re
import subprocess
import sys
import tarfile
from pathlib import Path
from types import ModuleType
from typing import List

import numpy as np
import paddle
import pytest

from prune_callbacks import count_flops, load_pruned
from prune_callbacks.deploy.io import read_plans

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
# Tiny settings (~15 s a run). --lr 0.1 rather than the digits default: after 4 steps the network
# must already beat zero accuracy on the sensitivity images, whose relative losses divide by it.
TINY = ["--scale", "0.25", "--epochs-before", "1", "--epochs-after", "1", "--train-samples", "128",
        "--val-samples", "64", "--num-samples", "32", "--batch-size", "32", "--lr", "0.1"]
LAST_CONV = "conv6._pointwise_conv.0"  # the tutorial's skip_vars=["conv2d_26.w_0"]
GROUPS = 14  # prunable groups of MobileNetV1
SCRIPTS = ["tutorial_mobilenet_cifar10.py", "manual_pruning.py"]


def run_example(script: str, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def printed_int(out: str, label: str) -> int:
    match = re.search(rf"^{re.escape(label)}: (\d+)$", out, re.M)
    assert match, f"no '{label}: N' line in:\n{out[-2000:]}"
    return int(match.group(1))


def check_flops(out: str, target: float) -> int:
    """The printed reduction is near the target and agrees with the printed FLOPs; returns after."""
    before = printed_int(out, "FLOPs before pruning")
    after = printed_int(out, "FLOPs after pruning")
    match = re.search(r"^Pruned FLOPs: ([\d.]+)% \(target ([\d.]+)%\)$", out, re.M)
    assert match, out[-2000:]
    pruned, printed_target = float(match.group(1)), float(match.group(2))
    assert printed_target == pytest.approx(100 * target)
    assert abs(pruned - 100 * target) < 1.0, f"pruned {pruned}% of FLOPs, target {100 * target}%"
    assert pruned == pytest.approx(100 * (1 - after / before), abs=0.006)
    return after


def check_outputs(out_dir: Path, flops_after: int) -> None:
    """Sensitivity JSON, a checkpoint that reloads into a fresh net, an export that matches it."""
    sens = json.loads((out_dir / "sensitivity.json").read_text())
    assert sens["format"] == "prune_callbacks.sensitivity/2"
    assert len(sens["losses"]) == GROUPS and all(len(p) == 9 for p in sens["losses"].values())
    assert 0 < sens["baseline"] <= 1

    prefix = out_dir / "checkpoint" / "pruned"
    for suffix in (".pdparams", ".pdopt", ".prune.json"):
        assert (prefix.parent / (prefix.name + suffix)).is_file(), suffix
    (plan,) = read_plans(str(prefix))
    assert LAST_CONV not in plan.ratios  # skipped, as the tutorial's skip_vars
    assert plan.flops_after == flops_after

    net = load_pruned(paddle.vision.models.mobilenet_v1(num_classes=10, scale=0.25), str(prefix))
    assert count_flops(net, [1, 3, 32, 32]) == flops_after
    exported = paddle.jit.load(str(out_dir / "inference" / "pruned"))
    x = paddle.to_tensor(np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype("float32"))
    net.eval()
    np.testing.assert_allclose(exported(x).numpy(), net(x).numpy(), rtol=1e-4, atol=1e-5)


def test_tutorial_on_digits(tmp_path) -> None:
    out = tmp_path / "out"
    proc = run_example("tutorial_mobilenet_cifar10.py", "--data", "digits", *TINY,
                       "--output-dir", str(out))
    flops_after = check_flops(proc.stdout, 0.4)
    check_outputs(out, flops_after)
    # fit evaluated both epochs, the first one already on the pruned network
    assert re.search(r"epoch 1: [\d.]+ +pruned at the end of its training", proc.stdout)
    assert re.search(r"epoch 2: [\d.]+ +pruned, fine-tuning", proc.stdout)
    assert "Total params:" in proc.stdout  # paddle.summary of the pruned net
    records = list((out / "vdl" / "prune").glob("vdlrecords.*"))
    assert records and records[0].stat().st_size > 0


def test_manual_pruning_on_digits(tmp_path) -> None:
    out = tmp_path / "out"
    proc = run_example("manual_pruning.py", *TINY, "--output-dir", str(out))
    flops_after = check_flops(proc.stdout, 0.4)
    check_outputs(out, flops_after)
    for line in ("before pruning: {", "before fine-tuning: {", "after fine-tuning: {",
                 "same outputs: True"):
        assert line in proc.stdout
    # the sensitivity table: a header of ratios and one row per group
    assert re.search(r"group +0\.1 +0\.2 .* 0\.9$", proc.stdout, re.M)
    assert len(re.findall(r"^  conv\S+(?: +-?\d\.\d{3}){9}$", proc.stdout, re.M)) == GROUPS


def _pickle_member(tar: tarfile.TarFile, name: str, payload: dict) -> None:
    raw = pickle.dumps(payload)
    info = tarfile.TarInfo(name)
    info.size = len(raw)
    tar.addfile(info, io.BytesIO(raw))


def mini_cifar10(path: Path, per_batch: int = 32, test_size: int = 64) -> Path:
    """A cifar-10-python.tar.gz in the real layout (pickles with bytes keys, uint8 [N, 3072]).

    Every class has its own colour, so a short training gets above chance, and every batch holds
    the ten classes in equal shares, so even a network that answers one class for everything
    scores above zero in the sensitivity baseline (whose relative losses divide by it).
    """
    rng = np.random.default_rng(0)
    colours = rng.integers(30, 226, size=(10, 3))

    def batch(n: int) -> dict:
        labels = np.arange(n) % 10
        rng.shuffle(labels)
        images = colours[labels][:, :, None] + rng.integers(-25, 26, size=(n, 3, 1024))
        data = np.clip(images, 0, 255).astype(np.uint8).reshape(n, 3072)
        return {b"labels": labels.tolist(), b"data": data}

    with tarfile.open(path, "w:gz") as tar:
        for i in range(1, 6):
            _pickle_member(tar, f"cifar-10-batches-py/data_batch_{i}",
                           {b"batch_label": f"training batch {i} of 5".encode(), **batch(per_batch)})
        _pickle_member(tar, "cifar-10-batches-py/test_batch",
                       {b"batch_label": b"testing batch 1 of 1", **batch(test_size)})
        _pickle_member(tar, "cifar-10-batches-py/batches.meta",
                       {b"label_names": [b"class_%d" % i for i in range(10)]})
    return path


def test_tutorial_on_a_cifar10_tarball(tmp_path) -> None:
    data = mini_cifar10(tmp_path / "cifar-10-python.tar.gz")
    out = tmp_path / "out"
    proc = run_example("tutorial_mobilenet_cifar10.py", "--data", "cifar10", "--data-file", str(data),
                       *TINY, "--output-dir", str(out))
    assert "cifar10: 128 train / 64 val images, image shape (3, 32, 32)" in proc.stdout
    check_outputs(out, check_flops(proc.stdout, 0.4))


@pytest.fixture(autouse=True)
def _scripts_directory_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    """As when Python runs a script: its directory is importable (the examples share `_cli.py`)."""
    monkeypatch.syspath_prepend(str(EXAMPLES))


def load_example(script: str) -> ModuleType:
    """The example as a module, to call its functions without running main()."""
    spec = importlib.util.spec_from_file_location(f"example_{Path(script).stem}", EXAMPLES / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script", SCRIPTS)
def test_without_the_tarball_the_message_says_what_to_pass(script: str, tmp_path) -> None:
    example = load_example(script)
    missing = tmp_path / "nope.tar.gz"
    args = example.parse_args(["--data", "cifar10", "--data-file", str(missing)])
    with pytest.raises(SystemExit) as exc:
        example.load_data(args)
    message = str(exc.value.code)
    assert str(missing) in message and "--data-file" in message and "--data digits" in message


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("bad, message", [
    (["--flops", "1.5"], "--flops 1.5 must be in (0, 1)"),
    (["--num-samples", "0"], "--num-samples 0 must be >= 1"),
    (["--epochs-before", "0"], "--epochs-before must be >= 1"),
    (["--data", "mnist"], "invalid choice: 'mnist'"),
])
def test_bad_options_stop_before_any_work(script: str, bad: List[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        load_example(script).parse_args(bad)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_segmentation_example_with_train_only_head() -> None:
    """A UNet whose auxiliary head runs only in training, pruned inside fit with an mIoU
    sensitivity metric: it prunes to the target and fine-tunes (train and eval graphs agree)."""
    proc = run_example("segmentation.py", "--tiny")
    for line in ("mIoU before pruning: ", "mIoU right after pruning: ", "mIoU fine-tuned: "):
        assert re.search(re.escape(line) + r"0\.\d{4}", proc.stdout), proc.stdout
    cut = float(re.search(r"pruned FLOPs: ([\d.]+)% \(target 40%\)", proc.stdout).group(1))
    assert 40.0 <= cut <= 41.0


def test_detection_example_prunes_a_shared_head_detector_inside_fit() -> None:
    """A small anchor-free detector (FPN, one head for every level, loss over targets outside
    the network) pruned inside fit with a mAP sensitivity metric, then fine-tuned."""
    proc = run_example("detection.py", "--tiny")
    for line in ("mAP@0.5 before pruning: ", "mAP@0.5 right after pruning: ",
                 "mAP@0.5 fine-tuned: "):
        assert re.search(re.escape(line) + r"[01]\.\d{4}", proc.stdout), proc.stdout
    assert "shared head: tower conv" in proc.stdout
    cut = float(re.search(r"pruned FLOPs: ([\d.]+)% \(target 40%\)", proc.stdout).group(1))
    assert 40.0 <= cut <= 45.0  # the tiny network's groups (8 to 32 channels) are coarse steps


def test_detection_example_map_is_one_on_perfect_predictions() -> None:
    """The example's mAP metric scores predictions made from the targets themselves 1.0, and
    drops when the boxes are shifted off the objects."""
    det = load_example("detection.py")
    data = det.Shapes(8, seed=3)
    pts, strides, levels = det.locations(64)
    loss = det.DetectionLoss(64)
    label, sides = det.assign(paddle.to_tensor(data.y), loss.pts, loss.strides, loss.lo, loss.hi)
    label, sides = label.numpy(), sides.numpy()
    logits = np.where(np.arange(det.CLASSES) == label[..., None], 10.0, -10.0)
    raw = np.log(np.expm1(np.maximum(sides, 1e-3)))  # softplus(raw) == sides
    pred = np.concatenate([logits, raw], axis=-1).astype("float32")
    metric = det.DetectionMAP()
    metric.update(pred, data.y)
    assert metric.accumulate() == pytest.approx(1.0)
    metric.reset()
    metric.update(np.concatenate([logits, raw + 3.0], axis=-1).astype("float32"), data.y)
    assert metric.accumulate() < 0.5
