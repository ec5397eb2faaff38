"""Bad input and unlucky moments: whatever can be checked is checked before the first
batch, with one message naming the value and the fix; no kill at any moment destroys a good file."""
from __future__ import annotations

import json
import math
import re
import os
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import paddle
import paddle.nn as nn
import pytest
from paddle.vision import models

import prune_callbacks
from prune_callbacks import FilterPruneCallback, FilterPruner, PruneVisualDL, SensitivityCallback, SensitivityResult, export, load_pruned, save_pruned
from prune_callbacks.deploy.io import read_plans
from prune_callbacks.planning.allocation import n_keep

RATIOS = (0.25, 0.5)
SHAPE = [1, 3, 12, 12]


class NoTraining(paddle.callbacks.Callback):
    """Counts training batches: an early error must come before the first one."""

    def __init__(self) -> None:
        super().__init__()
        self.batches = 0

    def on_train_batch_begin(self, step: int, logs: Optional[Dict] = None) -> None:
        self.batches += 1


def error_before_training(model: paddle.Model, ds: Any, callback: Any,
                          epochs: int = 2) -> Tuple[str, int]:
    """Fit with `callback`; the ValueError's message ("" if none) and the batches trained."""
    spy = NoTraining()
    try:
        model.fit(ds, epochs=epochs, batch_size=16, verbose=0, callbacks=[callback, spy])
    except ValueError as e:
        return str(e), spy.batches
    return "", spy.batches


@pytest.fixture()
def read_only_dir(tmp_path: Path) -> str:
    """A directory no file can be created in (as root, chmod is not enough: fall back to /sys)."""
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    for cand in (str(d), "/sys"):
        try:
            with tempfile.TemporaryFile(dir=cand):
                pass
        except OSError:
            return cand
    pytest.skip("no read-only directory available here")


@pytest.fixture()
def fitted(tiny: Any, make_model: Any) -> Any:
    net, ds = tiny
    return make_model(net, size=12), ds


def sens_file(net: nn.Layer, ds: Any, path: Path, criterion: str = "l1") -> str:
    FilterPruner(net, SHAPE, criterion).sensitivity(ds, ratios=RATIOS, path=str(path))
    return str(path)


# ---------------------------------------------------------------------------------------------
# Item 2: late failures move to on_train_begin
# ---------------------------------------------------------------------------------------------


def test_prune_callback_with_a_corrupt_or_directory_sensitivity_fails_before_training(
        fitted: Any, tmp_path: Path) -> None:
    model, ds = fitted
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "prune_callbacks.sensitivity/2", "crit')
    message, batches = error_before_training(model, ds, FilterPruneCallback(flops=0.3, sensitivity=str(bad)))
    assert re.search("corrupt", message) and batches == 0, (message, batches)
    message, batches = error_before_training(model, ds, FilterPruneCallback(flops=0.3, sensitivity=str(tmp_path)))
    assert re.search("is a directory", message) and batches == 0, (message, batches)


def test_sensitivity_callback_bad_paths_fail_before_training(fitted: Any, tmp_path: Path,
                                                             read_only_dir: str) -> None:
    model, ds = fitted
    message, batches = error_before_training(model, ds, SensitivityCallback(ds, path=str(tmp_path)))
    assert re.search("is a directory", message) and batches == 0, (message, batches)
    corrupt = tmp_path / "c.json"
    corrupt.write_text("{not json")
    message, batches = error_before_training(model, ds, SensitivityCallback(ds, path=str(corrupt)))
    assert re.search("corrupt", message) and batches == 0, (message, batches)
    target = os.path.join(read_only_dir, "sen.json")
    with pytest.raises(ValueError, match=f"cannot write sensitivity file '{target}'") as err:
        model.fit(ds, epochs=1, batch_size=16, verbose=0,
                  callbacks=[SensitivityCallback(ds, path=target)])
    assert ".tmp" not in str(err.value)  # the user's path, not a temp file


def test_engine_write_errors_name_the_users_file(tiny: Any, read_only_dir: str) -> None:
    net, ds = tiny
    target = os.path.join(read_only_dir, "sen.json")
    with pytest.raises(OSError, match=f"cannot write '{target}'"):
        FilterPruner(net, SHAPE).sensitivity(ds, ratios=RATIOS, path=target)


def test_visualdl_read_only_directory_fails_before_training(fitted: Any, read_only_dir: str,
                                                            tmp_path: Path) -> None:
    model, ds = fitted
    message, batches = error_before_training(model, ds, PruneVisualDL(os.path.join(read_only_dir, "vdl")))
    assert re.search("cannot write its logs", message) and batches == 0, (message, batches)
    ok = tmp_path / "vdl"
    model.fit(ds, epochs=1, batch_size=16, verbose=0, callbacks=[PruneVisualDL(str(ok))])
    assert not ok.exists()  # the check leaves no empty directory behind


def test_unreachable_targets_fail_before_training(fitted: Any) -> None:
    model, ds = fitted
    names = [g.name for g in FilterPruner(model.network, SHAPE).prunable_groups]
    sens = SensitivityCallback(ds, ratios=(0.2, 0.6))
    message, batches = error_before_training(model, ds, FilterPruneCallback(flops=0.99, sensitivity=sens))
    assert re.search(r"0\.990 cannot be reached: the largest reachable .* is 0\.\d+", message) and batches == 0, (message, batches)
    message, batches = error_before_training(model, ds, FilterPruneCallback(flops=0.3, skip=names))
    assert re.search("no group can be pruned", message) and batches == 0, (message, batches)
    message, batches = error_before_training(model, ds, FilterPruneCallback(
        flops=0.3, sensitivity=SensitivityCallback(ds, ratios=(0.5,), skip=names)))
    assert re.search("no group can be pruned", message) and batches == 0, (message, batches)


# ---------------------------------------------------------------------------------------------
# Item 1: a sensitivity file is tied to the network and its weights
# ---------------------------------------------------------------------------------------------


def test_file_of_another_architecture_is_refused(tiny: Any, tmp_path: Path) -> None:
    net, ds = tiny
    path = sens_file(net, ds, tmp_path / "sen.json")

    class Wider(nn.Layer):  # same group names and channel counts, another layer type inside
        def __init__(self) -> None:
            super().__init__()
            self.inner = type(net)()
            self.inner.c1[2] = nn.ReLU6()

        def forward(self, x: paddle.Tensor) -> paddle.Tensor:
            return self.inner(x)

    other = type(net)()
    other.c1[2] = nn.ReLU6()
    with pytest.raises(ValueError, match=r"different network: layer 'c1.2': ReLU there, ReLU6"):
        FilterPruner(other, SHAPE).sensitivity(ds, ratios=RATIOS, path=path)
    with pytest.raises(ValueError, match="different network: it was made for a TinyNet, this "
                                         "network is a Wider"):
        FilterPruner(Wider(), SHAPE).sensitivity(ds, ratios=RATIOS, path=path)
    # the prune callback and the engine's planning refuse it as well
    with pytest.raises(ValueError, match="different network"):
        FilterPruner(other, SHAPE).prune_to_flops(0.2, sensitivities=path)


def test_resnet18_file_is_refused_by_resnet34(tmp_path: Path, make_model: Any) -> None:
    r18, r34 = models.resnet18(num_classes=4), models.resnet34(num_classes=4)
    p18 = FilterPruner(r18, [1, 3, 32, 32])
    res = SensitivityResult(baseline=0.5, ratios=(0.5,), criterion="l1")
    res.losses = {g.name: {0.5: 0.1} for g in p18.prunable_groups}
    from prune_callbacks.sensitivity.fingerprint import network_signature
    res.network = network_signature(r18, p18.groups)
    data = {"format": "prune_callbacks.sensitivity/2", "producer": "prune_callbacks",
            "criterion": "l1", "ratios": [0.5], "input_shape": [1, 3, 32, 32], "data": "",
            "network": res.network, "groups": {g: 1 for g in res.losses}, "baseline": 0.5,
            "losses": {g: {"0.5": 0.1} for g in res.losses}}
    path = tmp_path / "r18.json"
    path.write_text(json.dumps(data))
    model = make_model(r34)
    spy = NoTraining()
    with pytest.raises(ValueError, match=r"was made for a different network: .*(group|layer|param)"):
        model.fit(_Rand(8), epochs=1, batch_size=4, verbose=0,
                  callbacks=[FilterPruneCallback(flops=0.2, sensitivity=str(path)), spy])
    assert spy.batches == 0


class _Rand(paddle.io.Dataset):
    def __init__(self, n: int, shape: tuple = (3, 32, 32)) -> None:
        self.n, self.shape = n, shape

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        rng = np.random.RandomState(i)
        return rng.randn(*self.shape).astype("float32"), np.array([i % 4], dtype="int64")


def test_file_of_other_weights_is_refused_before_reuse(tiny: Any, tmp_path: Path) -> None:
    net, ds = tiny
    path = sens_file(net, ds, tmp_path / "sen.json")
    with paddle.no_grad():
        w = net.fc.weight
        w.set_value(w.numpy()[:, ::-1].copy())  # same architecture, other weights
    with pytest.raises(ValueError, match=r"measured on other weights: its baseline metric is "
                                         r"0\.\d+, these weights score 0\.\d+"):
        FilterPruner(net, SHAPE).sensitivity(ds, ratios=RATIOS, path=path)


def test_older_format_is_read_with_a_clear_message(tiny: Any, tmp_path: Path) -> None:
    net, ds = tiny
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"format": "prune_callbacks.sensitivity/1", "criterion": "l1",
                                "ratios": [0.5], "groups": {}, "baseline": 0.5, "losses": {}}))
    with pytest.raises(ValueError, match="older prune_callbacks .* run the analysis again"):
        SensitivityResult.load(str(path))
    with pytest.raises(ValueError, match="older prune_callbacks"):
        FilterPruner(net, SHAPE).sensitivity(ds, ratios=RATIOS, path=str(path))


# ---------------------------------------------------------------------------------------------
# Items 3 and 4: atomic writes, modes that follow the umask
# ---------------------------------------------------------------------------------------------

_SAVER = textwrap.dedent("""
    import sys
    import paddle, paddle.nn as nn
    from prune_callbacks import FilterPruner, save_pruned
    paddle.seed(0)
    net = nn.Sequential(nn.Conv2D(3, 64, 3), nn.BatchNorm2D(64), nn.ReLU(), nn.Flatten(),
                        nn.Linear(64 * 14 * 14, 256))
    FilterPruner(net, [1, 3, 16, 16]).prune({"0": 0.5})
    k = 0
    while True:
        k += 1
        for p in net.parameters():
            p.set_value(paddle.full(p.shape, float(k), p.dtype))
        save_pruned(net, sys.argv[1])
        if k == 1:
            print("ready", flush=True)
""")


# The same loop, killed (SIGKILL) from inside the k-th save after half of one file's bytes are
# written: the worst moment, hit every time, whatever the machine's speed.
_MID_WRITE_KILL = textwrap.dedent("""
    import builtins, os, signal, sys
    suffix, kill_at = sys.argv[2], 3
    real_open, saves = builtins.open, [0]

    class Dying:
        def __init__(self, f):
            self.f = f
        def write(self, data):
            if saves[0] == kill_at:
                self.f.write(data[: max(1, len(data) // 2)])
                self.f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            return self.f.write(data)
        def __getattr__(self, name):
            return getattr(self.f, name)
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

    def open_(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if "w" in mode and suffix in os.fspath(file):
            saves[0] += 1
            return Dying(f)
        return f

    builtins.open = open_
""") + _SAVER


def _fresh() -> nn.Layer:
    return nn.Sequential(nn.Conv2D(3, 64, 3), nn.BatchNorm2D(64), nn.ReLU(), nn.Flatten(),
                         nn.Linear(64 * 14 * 14, 256))


def test_a_kill_during_save_never_destroys_the_last_checkpoint(tmp_path: Path) -> None:
    prefix = str(tmp_path / "ckpt")
    env = dict(os.environ, PYTHONPATH=str(Path(prune_callbacks.__file__).parent.parent))
    rng = np.random.RandomState(0)
    seen = set()
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", _SAVER, prefix], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            assert proc.stdout.readline().strip() == "ready"
            time.sleep(rng.uniform(0.05, 0.6))  # somewhere in the middle of a save
        finally:
            proc.kill()
            proc.wait()
        net = load_pruned(_fresh(), prefix)  # never EOFError, never a half file
        values = {float(np.unique(p.numpy())[0]) for p in net.parameters()}
        assert len(values) == 1  # every tensor from the same whole save
        seen |= values
        leftovers = [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
        for f in leftovers:  # a killed save leaves at most its temp file, which is harmless
            os.remove(tmp_path / f)
    assert seen and min(seen) >= 1


@pytest.mark.parametrize("suffix", [".pdparams", ".prune.json"])
def test_a_kill_in_the_middle_of_writing_a_file_leaves_the_previous_one(tmp_path: Path,
                                                                       suffix: str) -> None:
    prefix = str(tmp_path / "ckpt")
    env = dict(os.environ, PYTHONPATH=str(Path(prune_callbacks.__file__).parent.parent))
    proc = subprocess.run([sys.executable, "-c", _MID_WRITE_KILL, prefix, suffix], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]  # it was killed, mid-write
    assert len(read_plans(prefix)) == 1  # the plan file is whole
    net = load_pruned(_fresh(), prefix)
    values = {float(np.unique(p.numpy())[0]) for p in net.parameters()}
    # weights of the 2nd save (killed while writing the 3rd's weights), or of the 3rd (killed
    # while writing its plan file, written last: the old one holds the same plans)
    assert values == ({2.0} if suffix == ".pdparams" else {3.0})


def test_files_follow_the_umask_as_paddle_save_does(tiny: Any, tmp_path: Path) -> None:
    net, ds = tiny
    old = os.umask(0o022)
    try:
        FilterPruner(net, SHAPE).prune({"c1.0": 0.5})
        written = save_pruned(net, str(tmp_path / "a"))
        written.append(sens_file(net, ds, tmp_path / "sen.json"))
        paddle.save({"x": paddle.ones([1])}, str(tmp_path / "ref.pdparams"))
        ref = stat.S_IMODE(os.stat(tmp_path / "ref.pdparams").st_mode)
        assert ref == 0o644
        assert {p: stat.S_IMODE(os.stat(p).st_mode) for p in written} == {p: ref for p in written}
        os.umask(0o027)
        (tmp_path / "b.prune.json").unlink(missing_ok=True)
        written = save_pruned(net, str(tmp_path / "b"))
        assert {stat.S_IMODE(os.stat(p).st_mode) for p in written} == {0o640}
        os.chmod(written[0], 0o600)  # an existing file keeps its mode, as with open(path, "w")
        save_pruned(net, str(tmp_path / "b"))
        assert stat.S_IMODE(os.stat(written[0]).st_mode) == 0o600
        exported = export(net, str(tmp_path / "inf" / "net"), [None, 3, 12, 12])
        exported += export(net, str(tmp_path / "inf" / "net"), [None, 3, 12, 12])  # overwrite
        assert exported and {stat.S_IMODE(os.stat(p).st_mode) for p in exported} == {0o640}
        assert not [f for f in os.listdir(tmp_path / "inf") if f.startswith(".")]
    finally:
        os.umask(old)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


# ---------------------------------------------------------------------------------------------
# Item 7: smaller ones
# ---------------------------------------------------------------------------------------------


def test_engine_skip_as_one_name_and_numpy_scalars(tiny: Any) -> None:
    net, _ = tiny
    pruner = FilterPruner(net, SHAPE)
    kept = pruner.plan(np.float32(0.3), skip="c1.0", strategy="uniform")
    assert "c1.0" not in {pruner.groups[g].name for g in kept}
    plan = pruner.prune_to_flops(np.float64(0.2), skip="c1.0")
    assert "c1.0" not in plan.ratios
    pruner.prune({"c2.0": np.float32(0.25)})


def test_duplicate_ratios_are_refused(tiny: Any) -> None:
    net, ds = tiny
    with pytest.raises(ValueError, match="ratios must be distinct .* 0.5"):
        FilterPruner(net, SHAPE).sensitivity(ds, ratios=(0.5, 0.25, 0.5))
    with pytest.raises(ValueError, match="distinct"):
        SensitivityCallback(ds, ratios=(0.3, 0.3000000001))


@pytest.mark.parametrize("content, match", [
    ("[]", "holds a JSON list"), ("null", "holds a JSON NoneType"),
    (json.dumps({"format": "prune_callbacks.sensitivity/2"}), "damaged: it has no criterion"),
])
def test_empty_sensitivity_files(tiny: Any, tmp_path: Path, content: str, match: str) -> None:
    net, ds = tiny
    path = tmp_path / "s.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        SensitivityResult.load(str(path))
    with pytest.raises(ValueError, match=match):
        FilterPruner(net, SHAPE).sensitivity(ds, ratios=RATIOS, path=str(path))


def test_nan_curves_and_baselines_are_refused(tiny: Any, tmp_path: Path) -> None:
    net, ds = tiny
    pruner = FilterPruner(net, SHAPE)
    res = pruner.sensitivity(ds, ratios=RATIOS)
    name = next(iter(res.losses))
    res.losses[name][0.5] = float("nan")
    with pytest.raises(ValueError, match=f"group '{name}' at ratio 0.5 is nan.*diverged"):
        pruner.plan(0.2, res)
    with pytest.raises(ValueError, match="at ratio 0.5 is nan"):
        pruner.plan(0.2, {name: {0.25: 0.1, 0.5: float("nan")}})
    res.losses[name][0.5] = 0.2
    res.baseline = float("nan")
    with pytest.raises(ValueError, match="baseline metric nan.*diverged"):
        pruner.plan(0.2, res)
    path = tmp_path / "s.json"
    sens_file(net, ds, path)
    data = json.loads(path.read_text())
    data["baseline"] = float("nan")
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="baseline metric nan: the network had diverged"):
        SensitivityResult.load(str(path))


def test_analysis_of_a_diverged_network_is_refused(tiny: Any) -> None:
    net, ds = tiny
    with paddle.no_grad():
        net.fc.weight.set_value(paddle.full(net.fc.weight.shape, float("nan")))
    with pytest.raises(ValueError, match="scores nan .* diverged"):
        FilterPruner(net, SHAPE).sensitivity(lambda: float("nan"), ratios=RATIOS)


def test_damaged_checkpoints_name_the_file(tiny: Any, tmp_path: Path) -> None:
    net, _ = tiny
    FilterPruner(net, SHAPE).prune({"c1.0": 0.5})
    prefix = str(tmp_path / "ck")
    save_pruned(net, prefix)
    good = Path(prefix + ".pdparams").read_bytes()
    Path(prefix + ".pdparams").write_bytes(b"")
    with pytest.raises(ValueError, match=r"ck\.pdparams' is empty \(0 bytes\)"):
        load_pruned(type(net)(), prefix)
    Path(prefix + ".pdparams").write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match=r"ck\.pdparams' cannot be read"):
        load_pruned(type(net)(), prefix)
    Path(prefix + ".pdparams").write_bytes(good)
    header = json.loads(Path(prefix + ".prune.json").read_text())
    slices = header["plans"][0]["param_slices"]
    key = next(iter(slices))
    axis = next(iter(slices[key]))
    slices[key][axis][-1] = 999
    Path(prefix + ".prune.json").write_text(json.dumps(header))
    with pytest.raises(ValueError, match=f"plan 1 of 1 .* keeps index 999 on axis {axis} of '{key}'"):
        load_pruned(type(net)(), prefix)


# ---------------------------------------------------------------------------------------------
# Item 8: consistency of the callback API
# ---------------------------------------------------------------------------------------------


def test_strategy_is_chosen_from_whether_curves_are_given(tiny: Any) -> None:
    net, ds = tiny
    assert FilterPruneCallback(flops=0.4, at_epoch=4).strategy == "uniform"
    assert FilterPruneCallback(flops=0.4, sensitivity=SensitivityCallback(ds)).strategy == \
        "sensitivity"
    assert FilterPruneCallback(flops=0.4, sensitivity="s.json", strategy="uniform").strategy == \
        "uniform"
    with pytest.raises(ValueError, match="needs sensitivity="):
        FilterPruneCallback(flops=0.4, strategy="sensitivity")


def test_curves_of_another_criterion_are_refused(tiny: Any, tmp_path: Path, fitted: Any) -> None:
    net, ds = tiny
    with pytest.raises(ValueError, match="measured with criterion 'l2' but this callback prunes "
                                         "by 'l1'"):
        FilterPruneCallback(flops=0.3, sensitivity=SensitivityCallback(ds, criterion="l2"))
    res = FilterPruner(net, SHAPE, "l2").sensitivity(ds, ratios=RATIOS)
    with pytest.raises(ValueError, match="criterion 'l2'"):
        FilterPruneCallback(flops=0.3, sensitivity=res)
    with pytest.raises(ValueError, match="measured with criterion 'l2', but this pruner removes "
                                         "channels by 'l1'"):
        FilterPruner(net, SHAPE).plan(0.2, res)
    model, _ = fitted
    path = sens_file(model.network, ds, tmp_path / "l2.json", criterion="l2")
    message, batches = error_before_training(model, ds, FilterPruneCallback(flops=0.2, sensitivity=path))
    assert re.search("criterion 'l2'", message) and batches == 0, (message, batches)


def test_prune_now_twice_with_one_step(fitted: Any) -> None:
    model, ds = fitted
    cb = FilterPruneCallback(flops=0.2)
    cb.set_model(model)
    cb.prune_now(0)
    with pytest.raises(ValueError, match="made all its 1 pruning step"):
        cb.prune_now(1)
    assert len(cb.plans) == 1


def test_sensitivity_callback_loads_data_when_training_begins_and_resets(fitted: Any) -> None:
    model, ds = fitted
    reads = []

    class Counting(paddle.io.Dataset):
        def __len__(self) -> int:
            return len(ds)

        def __getitem__(self, i: int) -> Any:
            reads.append(i)
            return ds[i]

    cb = SensitivityCallback(Counting(), at_epoch=0, ratios=RATIOS)
    assert reads == []  # __init__ reads no sample
    model.fit(ds, epochs=1, batch_size=16, verbose=0, callbacks=[cb])
    first = cb.result
    assert first is not None and len(reads) == len(ds)
    assert cb.eval_data._batches is None  # freed after the analysis
    model.fit(ds, epochs=1, batch_size=16, verbose=0, callbacks=[cb])
    assert cb.result is not first and len(reads) == 2 * len(ds)  # analysed again, not stale
    cb.at_epoch = 3
    with pytest.raises(ValueError, match="never runs"):
        model.fit(ds, epochs=1, batch_size=16, verbose=0, callbacks=[cb])
    assert cb.result is None  # a reused callback does not hand out the last fit's result


class _Scaler:
    """Stands in for an enabled GradScaler (paddle disables AMP scaling on CPU: empty state)."""

    def __init__(self, state: Dict[str, Any]) -> None:
        self.state = dict(state)

    def state_dict(self) -> Dict[str, Any]:
        return dict(self.state)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.state = dict(state)


def test_load_pruned_restores_the_amp_scaler(fitted: Any, tmp_path: Path, make_model: Any) -> None:
    model, ds = fitted
    model._scaler = _Scaler({"scale": np.array([512.0], dtype="float32"), "incr_count": 7})
    FilterPruner(model.network, SHAPE).prune({"c1.0": 0.5})
    written = save_pruned(model, str(tmp_path / "amp"))
    assert str(tmp_path / "amp.pdscaler") in written
    fresh = make_model(type(model.network)(), size=12)
    fresh._scaler = _Scaler({})
    load_pruned(fresh, str(tmp_path / "amp"))
    assert fresh._scaler.state["incr_count"] == 7
    assert float(np.asarray(fresh._scaler.state["scale"]).reshape(-1)[0]) == 512.0
    # prepared with AMP but before the first batch (paddle makes the scaler lazily): one is made
    amp = make_model(type(model.network)(), size=12)
    amp.prepare(amp._optimizer, nn.CrossEntropyLoss(), amp_configs="O1")
    assert amp._scaler is None
    load_pruned(amp, str(tmp_path / "amp"))
    assert isinstance(amp._scaler, paddle.amp.GradScaler)


# ---------------------------------------------------------------------------------------------
# Items 10 and 11: PaddleSlim's formats and rounding
# ---------------------------------------------------------------------------------------------


def test_plain_mapping_of_curves_is_accepted(tiny: Any) -> None:
    net, ds = tiny
    pruner = FilterPruner(net, SHAPE)
    res = pruner.sensitivity(ds, ratios=RATIOS)
    plain = {g: dict(pts) for g, pts in res.curves().items()}
    a = pruner.plan(0.2, res)
    b = pruner.plan(0.2, plain)
    assert {k: v.tolist() for k, v in a.items()} == {k: v.tolist() for k, v in b.items()}
    param = net.c1[0].weight.name  # PaddleSlim keys curves by parameter name
    c = pruner.plan(0.2, {param if g == "c1.0" else g: pts for g, pts in plain.items()})
    assert {k: v.tolist() for k, v in c.items()} == {k: v.tolist() for k, v in a.items()}


def test_rounding_follows_paddleslim() -> None:
    assert n_keep(256, 0.6) == 102 and n_keep(256, 0.5) == 128  # PaddleSlim's MobileNetV1 test
    assert n_keep(10, 0.25) == 8 and n_keep(10, 0.35) == 6  # nearest, ties to even like round()
    assert n_keep(3, 0.9) == 1  # PaddleSlim would remove all 3; one always stays
    net = models.mobilenet_v1(num_classes=10)
    pruner = FilterPruner(net, [1, 3, 32, 32])
    wide = [g.name for g in pruner.prunable_groups if g.channels == 256]
    kept = pruner.select({wide[0]: 0.6, wide[1]: 0.5})
    assert sorted(len(k) for k in kept.values()) == [102, 128]
    assert math.isclose(pruner.flops({wide[0]: 0.6}), pruner.graph.flops(
        {pruner.group_index(wide[0]): 102}))
