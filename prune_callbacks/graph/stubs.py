"""Tracing a forward that `paddle.jit.to_static` cannot fully convert: stub the failing layers.

Real detectors' losses, label assigners and post-processing (PaddleDetection's NMS, written for
the old static graph) often fail to convert while their backbone, neck and head convert fine. When
a conversion fails, the innermost sublayer of the network on the failing call stack is replaced,
for the conversion only, by a stub: it returns zeros shaped like what the layer returned on one
eager forward, and records which values it read. The tracer then blocks every channel a stub
reads (whatever it does with them stays possible) and gives its outputs blocked channels, so the
groups around it are left whole with a reason naming the layer. Up to `MAX_STUBS` layers are
stubbed, one per failed attempt. This module never changes a parameter; each stub is removed
before returning.
"""
from __future__ import annotations

import contextlib
import logging
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import paddle
import paddle.nn as nn

logger = logging.getLogger(__name__)

MAX_STUBS = 8


class StubCaptureError(RuntimeError):
    """The eager forward whose outputs the stubs imitate failed."""


@dataclass
class StubRecord:
    """What the stubs of one conversion read and made: PIR value ids -> the stubbed layer's path."""

    inputs: Dict[int, str] = field(default_factory=dict)
    outputs: Dict[int, str] = field(default_factory=dict)
    paths: List[str] = field(default_factory=list)


def is_shape_error(e: BaseException) -> bool:
    """Whether paddle refused the input's shape (the user's error, not a conversion's)."""
    return isinstance(e, (ValueError, RuntimeError)) and "InvalidArgument" in str(e)


def _is_value(v: Any) -> bool:
    return isinstance(v, paddle.pir.Value)


def _flat(v: Any) -> List[Any]:
    if isinstance(v, dict):
        return [x for item in v.values() for x in _flat(item)]
    if isinstance(v, (list, tuple)):
        return [x for item in v for x in _flat(item)]
    return [v]


def _method_of(owner: nn.Layer, name: str) -> bool:
    """Whether `name` is a method the layer's own class defines (not paddle's Layer machinery,
    nor a branch function dy2static made)."""
    return name == "forward" or (callable(getattr(type(owner), name, None))
                                 and not hasattr(nn.Layer, name))


def failing_layer(net: nn.Layer, error: BaseException,
                  skip: Sequence[Tuple[str, str]] = ()) -> Optional[Tuple[str, str]]:
    """(path, method) of the innermost method of a sublayer of `net` (not `net` itself, nor one
    in `skip`) on the call stack of `error` or of the exceptions it was raised from."""
    paths = {id(layer): path for path, layer in net.named_sublayers()}
    seen, chain = set(), []
    e: Optional[BaseException] = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    for exc in reversed(chain):  # the original error first: its stack is the deepest
        tb, found = exc.__traceback__, None
        while tb is not None:
            owner = tb.tb_frame.f_locals.get("self")
            name = tb.tb_frame.f_code.co_name
            if id(owner) in paths and _method_of(owner, name) and \
                    (paths[id(owner)], name) not in skip:
                found = (paths[id(owner)], name)
            tb = tb.tb_next
        if found is not None:
            return found
    return None


def _capture(net: nn.Layer, methods: Dict[Tuple[str, str], nn.Layer],
             run: Callable[[], Any]) -> Dict[Tuple[str, str], Any]:
    """What each (path, method) returns on its first call in one eager forward (`run`), norm
    statistics restored."""
    outputs: Dict[Tuple[str, str], Any] = {}
    for key, layer in methods.items():
        bound = getattr(layer, key[1])

        def spy(*args: Any, key: Tuple[str, str] = key, bound: Any = bound, **kw: Any) -> Any:
            out = bound(*args, **kw)
            outputs.setdefault(key, out)
            return out
        layer.__dict__[key[1]] = spy
    saved = [(t, t.numpy().copy()) for t in net.state_dict().values()]
    try:
        with paddle.no_grad():
            run()
    finally:
        for key, layer in methods.items():
            layer.__dict__.pop(key[1], None)
        for t, value in saved:
            t.set_value(value)
    return outputs


def _zeros_like(example: Any, record: StubRecord, path: str) -> Any:
    if isinstance(example, paddle.Tensor):
        out = paddle.zeros(example.shape, dtype=example.dtype)
        record.outputs[out.id] = path
        return out
    if isinstance(example, dict):
        return {k: _zeros_like(v, record, path) for k, v in example.items()}
    if isinstance(example, (list, tuple)):
        return type(example)(_zeros_like(v, record, path) for v in example)
    return example


def _stub_forward(record: StubRecord, path: str, example: Any) -> Callable[..., Any]:
    @paddle.jit.not_to_static
    def forward(self: nn.Layer, *args: Any, **kwargs: Any) -> Any:
        for v in _flat(list(args) + list(kwargs.values())):
            if _is_value(v):
                record.inputs[v.id] = path
        return _zeros_like(example, record, path)
    return forward


@contextlib.contextmanager
def stubbed(net: nn.Layer, methods: Sequence[Tuple[str, str]], run: Callable[[], Any],
            record: StubRecord) -> Iterator[None]:
    """While inside, each (layer path, method) of `methods` is a stub (see the module
    docstring); `run` makes the eager forward whose outputs the stubs imitate."""
    layers = dict(net.named_sublayers())
    chosen = {key: layers[key[0]] for key in methods}
    try:
        examples = _capture(net, chosen, run) if chosen else {}
    except Exception as e:  # noqa: BLE001  (the eager forward itself fails: not a conversion)
        raise StubCaptureError(f"the eager forward the stubs imitate fails: {e}") from e
    for key, layer in chosen.items():
        what = key[0] if key[1] == "forward" else f"{key[0]}.{key[1]}()"
        # not called on this forward: it reads nothing and returns None
        stub = _stub_forward(record, what, examples.get(key))
        layer.__dict__[key[1]] = types.MethodType(stub, layer)
    record.paths = [key[0] if key[1] == "forward" else f"{key[0]}.{key[1]}()" for key in methods]
    try:
        yield
    finally:
        for key, layer in chosen.items():
            layer.__dict__.pop(key[1], None)


def build_with_stubs(net: nn.Layer, build: Callable[[], Any], run: Callable[[], Any],
                     what: str) -> Any:
    """`build()` (a program conversion), stubbing the failing method after each failure.

    Returns:
        (build()'s result, the StubRecord).

    Raises:
        the last conversion error, when no sublayer's method is on its stack or `MAX_STUBS`
        methods were stubbed already; `StubCaptureError` when the eager forward fails.
    """
    methods: List[Tuple[str, str]] = []
    while True:
        record = StubRecord()
        try:
            with stubbed(net, methods, run, record):
                return build(), record
        except StubCaptureError:
            raise
        except Exception as e:  # noqa: BLE001  (paddle raises anything from user code)
            key = None if is_shape_error(e) else failing_layer(net, e, skip=methods)
            if key is None or len(methods) >= MAX_STUBS:
                raise
            # a stub inside another stub is never called: keep the outer one only
            methods = [m for m in methods if not m[0].startswith(key[0] + ".")]
            logger.info("%s: %s.%s() does not convert (%s: %s); stubbing it", what, key[0],
                        key[1], type(e).__name__, str(e).strip().splitlines()[-1][:200])
            methods.append(key)
