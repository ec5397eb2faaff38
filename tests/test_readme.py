"""Every `train.py` command shown in README.md and the pages of docs/ runs.

Commands are taken from the pages' fenced bash/sh/shell/console blocks and from inline code spans
that start with `python train.py`. Each runs with tiny settings put in place of its sizes (few samples,
one epoch per phase, few sensitivity points): in-process through `train(cfg)` composed with Hydra's
compose API, or as a subprocess for sweeps (`-m`), `--help`/`--cfg`, `hydra.*` overrides and
`paddle.distributed.launch`. Files a test cannot have are built in miniature: a CIFAR-10 tarball for
`data=cifar10 data.path=...`, an image folder for `data=folder data.path=...`, a finished run for
`trainer.resume=...`, and a module holding a small network for a `model._target_` that does not
import (run from the directory holding it, as a user would). Only the commands of SKIP are not run.
"""
from __future__ import annotations

import importlib
import io
import json
import os
import pickle
import re
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import pytest

from prune_callbacks.app import train
from app_helpers import ROOT, make_cfg, write_images

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Commands not run, each with the reason. Only what this machine cannot run belongs here.
SKIP = {
    "trainer.device=gpu": "needs a CUDA build of paddle and a GPU; the CPU launch command is run instead",
    "--gpus": "needs GPUs; the CPU launch command (--nproc_per_node) is run instead",
}

# Put in place of a command's own values (sizes only; what a command chooses is kept).
TINY = {
    "data.train_samples": "64", "data.val_samples": "32", "trainer.epochs_before": "1",
    "trainer.epochs_after": "1", "trainer.batch_size": "32", "trainer.eval_batch_size": "32",
    "trainer.verbose": "0", "prune.sensitivity_samples": "16", "prune.ratios": "[0.3,0.6,0.9]",
}


def _shell_commands(text: str) -> List[str]:
    """Commands in a shell block: comments dropped, `\\` continuations joined, `&&`/`;` chains split."""
    joined = re.sub(r"\\\n\s*", " ", text)
    found = []
    for line in joined.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line).strip().lstrip("$ ").strip()
        found += [part.strip() for part in re.split(r"&&|;", line) if part.strip()]
    return found


def readme_commands(text: str) -> List[str]:
    """The `train.py` commands of a README: fenced shell blocks and inline `python train.py ...` spans."""
    commands = []
    for lang, body in re.findall(r"```(\w*)\n(.*?)```", text, flags=re.S):
        if lang in ("bash", "sh", "shell", "console", ""):
            commands += [c for c in _shell_commands(body) if "train.py" in c.split(" ")[:12]
                         and c.startswith(("python", "PYTHONPATH"))]
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    commands += re.findall(r"`(python train\.py[^`]*)`", prose)
    return list(dict.fromkeys(" ".join(c.split()) for c in commands))


COMMANDS = list(dict.fromkeys(c for page in PAGES for c in readme_commands(page.read_text(encoding="utf-8"))))


def test_the_readme_shows_train_commands() -> None:
    assert "python train.py" in COMMANDS and len(COMMANDS) >= 3, COMMANDS


def test_command_extraction() -> None:
    text = ("x\n```bash\npip install -e . && python train.py  # all\npython train.py a=1 \\\n  b=2\n```\n"
            "and `python train.py -m c=1,2` here\n```python\npython train.py no=1\n```\n")
    assert readme_commands(text) == ["python train.py", "python train.py a=1 b=2", "python train.py -m c=1,2"]


# ------------------------------------------------------------------ miniature files


def _pickle_member(tar: tarfile.TarFile, name: str, payload: dict) -> None:
    raw = pickle.dumps(payload)
    info = tarfile.TarInfo(name)
    info.size = len(raw)
    tar.addfile(info, io.BytesIO(raw))


def mini_cifar(folder: Path) -> Path:
    """cifar-10-python.tar.gz in the real layout: 5 train batches of 16 images, a test batch of 16."""
    rng = np.random.default_rng(0)
    path = folder / "cifar-10-python.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for member in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            data = rng.integers(0, 256, size=(16, 3072), dtype=np.uint8)
            _pickle_member(tar, f"cifar-10-batches-py/{member}",
                           {b"batch_label": member.encode(), b"labels": rng.integers(0, 10, 16).tolist(), b"data": data})
        _pickle_member(tar, "cifar-10-batches-py/batches.meta", {b"label_names": []})
    return path


def mini_folder(folder: Path) -> Path:
    root = folder / "images"
    write_images(root / "train", 6, np.random.default_rng(0))
    write_images(root / "val", 2, np.random.default_rng(1), start=100)
    return root


USER_NET = '''"""A small network standing in for the README's own-network example."""
import paddle


class {name}(paddle.nn.Layer):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 8, **kwargs) -> None:
        super().__init__()
        self.conv = paddle.nn.Conv2D(in_channels, width, 3, padding=1)
        self.bn = paddle.nn.BatchNorm2D(width)
        self.pool = paddle.nn.AdaptiveAvgPool2D(1)
        self.fc = paddle.nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(paddle.flatten(self.pool(paddle.nn.functional.relu(self.bn(self.conv(x)))), 1))
'''


def user_module(cwd: Path, target: str) -> None:
    """Write the module `target` names under `cwd` (a package path such as mypkg/nets.py)."""
    module, _, name = target.rpartition(".")
    parts = module.split(".")
    for i in range(1, len(parts)):
        pkg = cwd.joinpath(*parts[:i])
        pkg.mkdir(parents=True, exist_ok=True)
        (pkg / "__init__.py").touch()
    cwd.joinpath(*parts[:-1]).mkdir(parents=True, exist_ok=True)
    cwd.joinpath(*parts[:-1], parts[-1] + ".py").write_text(USER_NET.format(name=name))


def _importable(target: str) -> bool:
    module, _, name = target.rpartition(".")
    try:
        return hasattr(importlib.import_module(module), name)
    except ImportError:
        return False


# ------------------------------------------------------------------ turning a command into a tiny run


def _split(command: str) -> Tuple[List[str], List[str], List[str]]:
    """(launcher args before train.py, train.py flags such as -m/--help, key=value overrides)."""
    words = shlex.split(command)
    at = next(i for i, w in enumerate(words) if w.endswith("train.py"))
    rest = words[at + 1:]
    return words[:at], [w for w in rest if w.startswith("-")], [w for w in rest if not w.startswith("-")]


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _sizes(values: Dict[str, str]) -> Dict[str, str]:
    """TINY, adjusted to what the command asks for (its pruning epoch, steps, model, data)."""
    sizes = dict(TINY)
    if "prune.at_epoch" in values:
        sizes["trainer.epochs_before"] = str(int(values["prune.at_epoch"]) + 1)
    if "prune.steps" in values:
        sizes["trainer.epochs_after"] = str(max(1, int(values["prune.steps"]) - 1))
    if "trainer.resume" in values:
        sizes["trainer.epochs_after"] = "2"  # one epoch more than the run it resumes
    if values.get("model", "mobilenet_v1").startswith("mobilenet") and "model._target_" not in values:
        sizes["model.scale"] = "0.25"
    if values.get("data") == "folder":
        sizes["data.image_size"] = "32"
    if "prune.latency" in values:  # a few timed calls each; the search, not the ~50-export table
        sizes["+prune.latency_options.warmup"] = "1"  # (the table's own tests: test_latency*.py)
        sizes["+prune.latency_options.repeats"] = "3"
        sizes["+prune.latency_options.method"] = "search"
    return sizes


def tiny(overrides: List[str], tmp: Path, resume_dir: Optional[Path]) -> Tuple[List[str], Optional[Path]]:
    """The overrides with tiny sizes and miniature files; the cwd a user's module was written to."""
    values: Dict[str, str] = {_key(o): o.split("=", 1)[1] for o in overrides if "=" in o}
    sizes = _sizes(values)
    out, cwd = [], None
    for o in overrides:
        key = _key(o)
        if key in sizes or key in ("output_dir", "hydra.run.dir", "hydra.sweep.dir"):
            continue  # a size: replaced below; a place: the test's directory
        if key == "data.path":
            data = values.get("data", "digits")
            o = f"data.path={mini_cifar(tmp) if data == 'cifar10' else mini_folder(tmp)}"
        elif key == "trainer.resume":
            assert resume_dir is not None
            o = f"trainer.resume={resume_dir}"
        elif key == "model._target_" and not _importable(values[key]):
            cwd = tmp / "project"
            user_module(cwd, values[key])
        out.append(o)
    return out + [f"{k}={v}" for k, v in sizes.items()], cwd


@pytest.fixture(scope="module")
def resume_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run with the default callbacks: its resume point is what trainer.resume continues."""
    out = tmp_path_factory.mktemp("resumable")
    train(make_cfg([f"{k}={v}" for k, v in TINY.items()] + ["model.scale=0.25"], out))
    return out


def _run_subprocess(launcher: List[str], flags: List[str], overrides: List[str], tmp: Path,
                    cwd: Optional[Path]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    where = [f"hydra.sweep.dir={tmp / 'sweep'}"] if "-m" in flags or "--multirun" in flags else \
        [f"hydra.run.dir={tmp / 'run'}"]
    if launcher and "paddle.distributed.launch" in launcher:
        launcher = [w for w in launcher if w != "python"]
        if "--log_dir" in launcher:
            launcher[launcher.index("--log_dir") + 1] = str(tmp / "log")
        prefix = [sys.executable, *launcher]
    else:
        prefix = [sys.executable]
    info = flags and all(f in ("--help", "-h", "--cfg", "--info") for f in flags)
    return subprocess.run([*prefix, str(ROOT / "train.py"), *flags, *(overrides + where if not info else overrides)],
                          capture_output=True, text=True, timeout=600, cwd=cwd or tmp, env=env)


def run_command(command: str, tmp_path: Path, request: pytest.FixtureRequest) -> Tuple[bool, str]:
    """Run one README command on tiny settings: whether it did its job, and what it printed."""
    reason = next((why for text, why in SKIP.items() if text in command), None)
    if reason:
        pytest.skip(reason)
    launcher, flags, overrides = _split(command)
    resume = request.getfixturevalue("resume_dir") if any(_key(o) == "trainer.resume" for o in overrides) else None
    if flags and all(f in ("--help", "-h") for f in flags) or "--cfg" in flags:
        proc = _run_subprocess(launcher, flags, overrides, tmp_path, None)
        shown = "Powered by Hydra" in proc.stdout or "prune:" in proc.stdout
        return proc.returncode == 0 and shown, f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    overrides, cwd = tiny(overrides, tmp_path, resume)
    needs_process = launcher and "paddle.distributed.launch" in " ".join(launcher) or flags or cwd is not None \
        or any(o.startswith(("hydra.", "hydra/")) for o in overrides)
    if needs_process:
        proc = _run_subprocess(launcher, flags, overrides, tmp_path, cwd)
        one_table = proc.stdout.count("Results:") == 1 or "Sweep results" in proc.stdout
        return proc.returncode == 0 and one_table, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    results = train(make_cfg(overrides, tmp_path / "run"))
    pruned = results["flops_after"] < results["flops_before"] and results["diverged"] is None
    return pruned, json.dumps(results, default=str)[-3000:]


# Several processes bind ports: under pytest-xdist they all run on one worker, one at a time.
@pytest.mark.parametrize("command", [
    pytest.param(c, marks=pytest.mark.xdist_group("distributed")) if "paddle.distributed" in c else c
    for c in COMMANDS])
def test_readme_command_runs(command: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    ok, output = run_command(command, tmp_path, request)
    assert ok, f"{command}\n{output}"
