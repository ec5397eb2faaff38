"""Tests of PruneVisualDL: what it writes (read back with visualdl.LogReader and the real server),
that it never writes a point twice whatever its place in the callback list, and that it coexists
with paddle.callbacks.VisualDL in one log directory."""
from __future__ import annotations

import io
import json
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from typing import Any, Dict, List, Tuple

import numpy as np
import paddle
import pytest
from visualdl import LogReader, LogWriter

from prune_callbacks.callbacks.history import PruneEvent, history_of
from prune_callbacks.callbacks.visualdl import PruneVisualDL, plan_table, render_sensitivity
from prune_callbacks.planning.plans import GroupPlan, PrunePlan
from prune_callbacks.sensitivity import SensitivityResult

DOTTED = "conv2_1._pointwise_conv.0"


class FakeModel:
    """Stands in for paddle.Model: history_of() only needs an object to hang the history on."""


def _sens() -> SensitivityResult:
    return SensitivityResult(
        baseline=0.9, ratios=(0.1, 0.2, 0.3),
        losses={"conv1": {0.1: 0.01, 0.2: 0.05, 0.3: 0.25}, DOTTED: {0.1: 0.02, 0.2: None, 0.3: None}},
        channels={"conv1": 8, DOTTED: 16})


def _plan(flops: Tuple[int, int], params: Tuple[int, int],
          groups: Tuple[Tuple[str, int, int], ...]) -> PrunePlan:
    """A plan whose groups are (name, channels, removed): the first `removed` channels go."""
    return PrunePlan(groups=tuple(GroupPlan(n, c, tuple(range(r, c)), tuple(range(r))) for n, c, r in groups),
                     flops_before=flops[0], flops_after=flops[1], params_before=params[0],
                     params_after=params[1], input_shape=(1, 3, 32, 32))


PLAN1 = _plan((1000, 700), (500, 400), (("conv1", 8, 2), (DOTTED, 16, 4)))  # 8->6, 16->12
PLAN2 = _plan((700, 560), (400, 350), (("conv1", 6, 1), (DOTTED, 12, 3)))   # 6->5, 12->9
EVENT1 = PruneEvent(epoch=1, step=10, flops=0.3, plan=PLAN1)
EVENT2 = PruneEvent(epoch=3, step=30, flops=0.44, plan=PLAN2)


def _read(run_dir: str) -> Dict[str, Any]:
    """{tag: [(step, value), ...]} for scalars, plus the raw reader under key None."""
    files = [f for f in os.listdir(run_dir) if "vdlrecords" in f]
    assert len(files) == 1, files
    reader = LogReader(file_path=os.path.join(run_dir, files[0]))
    tags = reader.get_tags()
    out: Dict[Any, Any] = {t: [(r.id, r.value) for r in reader.get_data("scalar", t)]
                           for t in tags.get("scalar", [])}
    out[None] = (reader, tags)
    return out


def _drive(callbacks: List[paddle.callbacks.Callback], model: Any, epochs: int) -> None:
    """Call the hooks in list order, as paddle.Model.fit's CallbackList does."""
    for cb in callbacks:
        cb.set_model(model)
        cb.on_train_begin()
    for epoch in range(epochs):
        for cb in callbacks:
            cb.on_epoch_begin(epoch)
        for cb in callbacks:
            cb.on_epoch_end(epoch)
    for cb in callbacks:
        cb.on_train_end()


class Publisher(paddle.callbacks.Callback):
    """Publishes like SensitivityCallback / FilterPruneCallback: sensitivity at the end of epoch 0,
    one event at the end of each epoch listed in `events`."""

    def __init__(self, events: Dict[int, PruneEvent]) -> None:
        super().__init__()
        self.events = events

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        hist = history_of(self.model)
        if epoch == 0:
            hist.sensitivity, hist.sensitivity_epoch = _sens(), 0
        if epoch in self.events:
            hist.events.append(self.events[epoch])


# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad, exc, match", [
    (3, TypeError, "log_dir=3"), (None, TypeError, "log_dir=None"), ("", ValueError, "log_dir=''"),
    ("  ", ValueError, "non-empty"), (b"dir", TypeError, "log_dir=b'dir'"),
    (type("BytesPath", (), {"__fspath__": lambda self: b"d"})(), TypeError, "got bytes"),
])
def test_bad_log_dir(bad: Any, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        PruneVisualDL(bad)


def test_bad_prefix_and_run(tmp_path: Any) -> None:
    with pytest.raises(TypeError, match="tag_prefix=1"):
        PruneVisualDL(str(tmp_path), tag_prefix=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="run=None"):
        PruneVisualDL(str(tmp_path), run=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="relative sub-directory"):
        PruneVisualDL(str(tmp_path), run="../elsewhere")
    assert PruneVisualDL(tmp_path).run_dir == os.path.join(str(tmp_path), "prune")  # PathLike ok


def test_nothing_written_without_history(tmp_path: Any) -> None:
    _drive([PruneVisualDL(str(tmp_path))], FakeModel(), epochs=2)
    assert not os.path.exists(tmp_path / "prune")  # lazy: no empty log file


def test_sensitivity_curves_and_figure(tmp_path: Any) -> None:
    model = FakeModel()
    hist = history_of(model)
    hist.sensitivity, hist.sensitivity_epoch = _sens(), 2
    cb = PruneVisualDL(str(tmp_path))
    _drive([cb], model, epochs=1)
    data = _read(cb.run_dir)
    assert data["sensitivity/conv1"] == [(10, pytest.approx(0.01)), (20, pytest.approx(0.05)),
                                         (30, pytest.approx(0.25))]
    assert data[f"sensitivity/{DOTTED}"] == [(10, pytest.approx(0.02))]  # None points skipped
    reader, tags = data[None]
    assert tags["image"] == ["sensitivity/figure"]
    images = reader.get_data("image", "sensitivity/figure")
    assert len(images) == 1
    from PIL import Image
    img = np.asarray(Image.open(io.BytesIO(images[0].image.encoded_image_string)))
    assert img.shape == (450, 700, 3) and img.std() > 0  # drawn, not blank


def test_render_sensitivity_draws_one_line_per_group() -> None:
    img = render_sensitivity(_sens())
    assert img.dtype == np.uint8 and img.shape == (450, 700, 3)
    blank = render_sensitivity(SensitivityResult(baseline=1.0, ratios=(0.1,)))
    assert (img != blank).any()


def test_prune_events(tmp_path: Any) -> None:
    model = FakeModel()
    cb = PruneVisualDL(str(tmp_path))
    history_of(model).events.extend([EVENT1, EVENT2])
    _drive([cb], model, epochs=1)
    data = _read(cb.run_dir)
    assert data["prune/flops"] == [(1, 1000), (2, 700), (3, 700), (4, 560)]
    assert data["prune/params"] == [(1, 500), (2, 400), (3, 400), (4, 350)]
    assert data["prune/pruned_flops"] == [(1, pytest.approx(0.3)), (3, pytest.approx(0.2))]
    assert data["prune/total_pruned_flops"] == [(1, pytest.approx(0.3)), (3, pytest.approx(0.44))]
    assert data["prune/ratio/conv1"] == [(1, pytest.approx(0.25)), (3, pytest.approx(1 / 6))]
    assert data[f"prune/ratio/{DOTTED}"] == [(1, pytest.approx(0.25)), (3, pytest.approx(0.25))]
    reader, tags = data[None]
    texts = reader.get_data("text", "prune/plan")
    assert [t.id for t in texts] == [1, 3]
    first = texts[0].text.encoded_text_string
    assert f"| {DOTTED} | 16 -> 12 | 25.0% |" in first
    assert "FLOPs 1,000 -> 700" in first and "pruned 30.0%" in first and "target 30.0%" in first
    second = texts[1].text.encoded_text_string
    assert "| conv1 | 6 -> 5 | 16.7% |" in second
    assert "pruned 44.0% (this step 20.0%) vs target 44.0%" in second


def test_consecutive_events_share_a_step_once(tmp_path: Any) -> None:
    model = FakeModel()
    history_of(model).events.extend([EVENT1, PruneEvent(2, 20, 0.44, PLAN2)])
    cb = PruneVisualDL(str(tmp_path))
    _drive([cb], model, epochs=1)
    assert _read(cb.run_dir)["prune/flops"] == [(1, 1000), (2, 700), (3, 560)]


def test_nothing_written_twice(tmp_path: Any) -> None:
    model = FakeModel()
    cb = PruneVisualDL(str(tmp_path))
    cb.set_model(model)
    hist = history_of(model)
    hist.sensitivity, hist.sensitivity_epoch = _sens(), 0
    hist.events.append(EVENT1)
    for epoch in range(4):  # every hook flushes; only the first may write
        cb.on_epoch_begin(epoch)
        cb.on_epoch_end(epoch)
    hist.events.append(EVENT2)           # published later: only it is new
    hist.sensitivity.losses[DOTTED][0.2] = 0.07  # a resumed analysis filled one more point
    hist.sensitivity.losses["conv1"][0.1] = 0.5  # a point already shown keeps its first value
    cb.on_epoch_end(4)
    cb.on_train_end()
    cb.on_train_end()
    data = _read(cb.run_dir)
    assert [s for s, _ in data["prune/flops"]] == [1, 2, 3, 4]
    assert data["sensitivity/conv1"] == [(10, pytest.approx(0.01)), (20, pytest.approx(0.05)),
                                         (30, pytest.approx(0.25))]
    assert data[f"sensitivity/{DOTTED}"] == [(10, pytest.approx(0.02)), (20, pytest.approx(0.07))]
    reader, _ = data[None]
    assert [r.id for r in reader.get_data("image", "sensitivity/figure")] == [0, 1]  # redrawn once
    assert len(reader.get_data("text", "prune/plan")) == 2


@pytest.mark.parametrize("vdl_first", [True, False])
def test_order_in_callback_list_does_not_matter(tmp_path: Any, vdl_first: bool) -> None:
    def run(where: str, first: bool) -> Dict[Any, Any]:
        cb = PruneVisualDL(str(tmp_path / where))
        pub = Publisher({1: EVENT1, 3: EVENT2})
        _drive([cb, pub] if first else [pub, cb], FakeModel(), epochs=5)
        return _read(cb.run_dir)

    got, ref = run("a", vdl_first), run("b", not vdl_first)
    ref_tags = ref.pop(None)[1]
    assert got.pop(None)[1] == ref_tags
    assert got == ref
    assert got["prune/flops"] == [(1, 1000), (2, 700), (3, 700), (4, 560)]


def test_publication_is_on_disk_by_the_next_epoch_begin(tmp_path: Any) -> None:
    # Listed before the publisher, PruneVisualDL sees epoch 1's event only at epoch 2's begin;
    # a live dashboard must get it then, not only at on_train_end.
    model = FakeModel()
    cb, pub = PruneVisualDL(str(tmp_path)), Publisher({1: EVENT1})
    for c in (cb, pub):
        c.set_model(model)
        c.on_train_begin()
    for c in (cb, pub):
        c.on_epoch_end(0)
    for c in (cb, pub):
        c.on_epoch_end(1)
    assert "prune/flops" not in _read(cb.run_dir)
    cb.on_epoch_begin(2)
    assert _read(cb.run_dir)["prune/flops"] == [(1, 1000), (2, 700)]
    cb.on_train_end()


def test_tag_prefix_and_own_directory(tmp_path: Any) -> None:
    model = FakeModel()
    history_of(model).events.append(EVENT1)
    cb = PruneVisualDL(str(tmp_path), tag_prefix="resnet/", run="")
    _drive([cb], model, epochs=1)
    data = _read(str(tmp_path))  # run="" writes into log_dir itself
    assert data["resnet/prune/flops"] == [(1, 1000), (2, 700)]
    assert "prune/flops" not in data and f"resnet/prune/ratio/{DOTTED}" in data
    assert data[None][1]["text"] == ["resnet/prune/plan"]


def test_warns_when_sharing_a_directory_with_another_writer(tmp_path: Any, caplog: Any) -> None:
    other = LogWriter(logdir=str(tmp_path))
    other.add_scalar("train/loss", 1.0, 0)
    other.close()
    model = FakeModel()
    history_of(model).events.append(EVENT1)
    with caplog.at_level(logging.WARNING, logger="prune_callbacks.callbacks.visualdl"):
        _drive([PruneVisualDL(str(tmp_path), run="")], model, epochs=1)
    assert "only the newest log file" in caplog.text


def test_non_zero_rank_writes_nothing(tmp_path: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr(paddle.distributed, "get_rank", lambda *a, **k: 1)
    model = FakeModel()
    history_of(model).events.append(EVENT1)
    _drive([PruneVisualDL(str(tmp_path))], model, epochs=1)
    assert os.listdir(tmp_path) == []


def test_second_fit_appends_to_the_same_file(tmp_path: Any) -> None:
    model = FakeModel()
    cb = PruneVisualDL(str(tmp_path))
    _drive([cb, Publisher({1: EVENT1})], model, epochs=2)
    time.sleep(1.1)  # VisualDL names files by the second: a new writer now would start a new file
    _drive([cb, Publisher({1: EVENT2})], model, epochs=2)  # a second fit with the same callback
    data = _read(cb.run_dir)  # asserts one file: the reader would only show the newest one
    assert data["prune/flops"] == [(1, 1000), (2, 700), (3, 700), (4, 560)]
    assert [s for s, _ in data["sensitivity/conv1"]] == [10, 20, 30]


def test_plan_table() -> None:
    text = plan_table(PLAN1, flops=0.3, total_pruned=0.3)
    assert text.splitlines()[:3] == ["| group | channels | ratio |", "|---|---|---|",
                                     "| conv1 | 8 -> 6 | 25.0% |"]


# ------------------------------------------------------------------------------------------------
# The real VisualDL server and a real paddle.Model.fit


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(port: int, path: str, **query: str) -> Any:
    url = f"http://127.0.0.1:{port}/app/api/{path}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    with urllib.request.urlopen(url, timeout=5) as resp:
        body = json.loads(resp.read())
    assert body["status"] == 0, body
    return body["data"]


@pytest.fixture
def vdl_server(tmp_path: Any):
    """Start `visualdl` on tmp_path/logs (written by the test first); yield (port, log_dir)."""
    log_dir = tmp_path / "logs"
    procs: List[subprocess.Popen] = []

    def start() -> int:
        port = _free_port()
        exe = os.path.join(os.path.dirname(sys.executable), "visualdl")
        proc = subprocess.Popen([exe, "--logdir", str(log_dir), "--host", "127.0.0.1", "--port", str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(proc)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"visualdl exited with {proc.returncode}"
            try:
                _get(port, "runs")
                return port
            except OSError:
                time.sleep(0.2)
        raise TimeoutError("visualdl server did not answer within 30 s")

    try:
        yield start, log_dir
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=10)


def test_server_shows_curves_next_to_training_run(vdl_server: Any) -> None:
    start, log_dir = vdl_server
    training = LogWriter(logdir=str(log_dir))  # what paddle.callbacks.VisualDL(log_dir) writes
    training.add_scalar("train/loss", 2.5, 0)
    training.close()
    model = FakeModel()
    _drive([Publisher({1: EVENT1}), PruneVisualDL(str(log_dir))], model, epochs=2)

    port = start()
    runs = _get(port, "runs")
    assert sorted(runs) == sorted([str(log_dir), str(log_dir / "prune")])
    prune_run = str(log_dir / "prune")
    tags = _get(port, "tags")  # {"<run>/<tag with / as %>": kind}
    assert tags[f"{prune_run}/sensitivity%{DOTTED}"] == "scalar"
    assert tags[f"{prune_run}/prune%flops"] == "scalar"
    assert tags[f"{prune_run}/sensitivity%figure"] == "image"
    assert tags[f"{log_dir}/train%loss"] == "scalar"
    curve = _get(port, "scalar/list", run=prune_run, tag=f"sensitivity/{DOTTED}")
    assert [(step, pytest.approx(v)) for _, step, v in curve] == [(10, 0.02)]
    curve = _get(port, "scalar/list", run=prune_run, tag="sensitivity/conv1")
    assert [step for _, step, _ in curve] == [10, 20, 30]
    assert [(s, v) for _, s, v in _get(port, "scalar/list", run=prune_run, tag="prune/flops")] == [
        (1, 1000.0), (2, 700.0)]
    assert [v for _, _, v in _get(port, "scalar/list", run=str(log_dir), tag="train/loss")] == [2.5]


class _Samples(paddle.io.Dataset):
    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        self.x = rng.normal(size=(16, 4)).astype("float32")
        self.y = rng.integers(0, 3, size=(16, 1)).astype("int64")

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> Tuple[np.ndarray, np.ndarray]:
        return self.x[i], self.y[i]


@pytest.mark.parametrize("vdl_first", [True, False])
def test_fit_with_paddle_visualdl_in_the_same_log_dir(tmp_path: Any, vdl_first: bool) -> None:
    paddle.seed(0)
    net = paddle.nn.Linear(4, 3)
    model = paddle.Model(net, [paddle.static.InputSpec([None, 4], "float32", "x")],
                         [paddle.static.InputSpec([None, 1], "int64", "y")])
    model.prepare(paddle.optimizer.SGD(0.1, parameters=net.parameters()),
                  paddle.nn.CrossEntropyLoss(), paddle.metric.Accuracy())
    log_dir = str(tmp_path / "vdl")
    ours, pub = PruneVisualDL(log_dir), Publisher({1: EVENT1})
    model.fit(_Samples(), epochs=2, batch_size=4, verbose=0,
              callbacks=[ours, pub, paddle.callbacks.VisualDL(log_dir)] if vdl_first
              else [pub, paddle.callbacks.VisualDL(log_dir), ours])

    data = _read(ours.run_dir)
    assert data["prune/flops"] == [(1, 1000), (2, 700)]
    assert [s for s, _ in data["sensitivity/conv1"]] == [10, 20, 30]
    assert ours._writer is None  # closed in on_train_end
    paddle_log = _read(log_dir)  # Paddle's own file, untouched by ours
    assert len(paddle_log["train/loss"]) == 8 and "prune/flops" not in paddle_log
    # One dashboard: the directory reader sees both runs, each with its own file.
    reader = LogReader(logdir=log_dir)
    assert sorted(reader.logs(update=True)) == sorted([log_dir, ours.run_dir])


def test_prune_event_names_its_target_flops() -> None:
    assert EVENT1.flops == 0.3
    assert EVENT1.target == 0.3  # the former field name still reads
