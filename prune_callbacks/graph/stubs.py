"""Tracing a forward that `paddle.jit.to_static` cannot fully convert: stub the failing methods.

Real detectors' losses, label assigners and post-processing (PaddleDetection's NMS, written for
the old static graph) often fail to convert while their backbone, neck and head convert fine. When
a conversion fails, the innermost method of a sublayer on the failing call stack (its `forward`,
or another method such as `post_process`) is replaced, for the conversion only, by a stub: it
returns zeros shaped like what the method returned on one eager forward, and records which
values it read. The tracer then blocks every channel a stub reads (whatever it does with them
stays possible), except along axes an eager probe shows it reads only the size of and not even
that (`_free_axes`: a loss laying out anchors from a feature map's height and width), and gives
its outputs blocked channels, so the groups around it are left whole with a reason naming the
layer. Up to `MAX_STUBS` methods are stubbed, one per failed attempt. This module never changes a
parameter; each stub is removed before returning.
"""
from __future__ import annotations

import contextlib
import logging
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple

import numpy as np
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
    # (path, leaf index of the arguments) -> axes along which the stubbed method's result does
    # not depend on that argument: neither on its values nor on its size there
    free_axes: Dict[Tuple[str, int], Set[int]] = field(default_factory=dict)
    leaf: Dict[int, int] = field(default_factory=dict)  # value id -> leaf index


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
             run: Callable[[], Any]) -> Tuple[Dict[Tuple[str, str], Any],
                                               Dict[Tuple[str, str], Dict[int, Set[int]]]]:
    """What each (path, method) returns on its first call in one eager forward (`run`), and
    for each of its tensor arguments the axes its result does not depend on (`_free_axes`);
    norm statistics restored."""
    outputs: Dict[Tuple[str, str], Any] = {}
    calls: Dict[Tuple[str, str], Tuple[Any, tuple, dict]] = {}
    own = {key: layer.__dict__.get(key[1], _MISSING) for key, layer in methods.items()}
    for key, layer in methods.items():
        bound = getattr(layer, key[1])

        def spy(*args: Any, key: Tuple[str, str] = key, bound: Any = bound, **kw: Any) -> Any:
            out = bound(*args, **kw)
            outputs.setdefault(key, out)
            calls.setdefault(key, (bound, args, kw))
            return out
        layer.__dict__[key[1]] = spy
    saved = [(t, t.numpy().copy()) for t in net.state_dict().values()]
    free: Dict[Tuple[str, str], Dict[int, Set[int]]] = {}
    try:
        with paddle.no_grad():
            run()
            for key, (bound, args, kw) in calls.items():
                free[key] = _free_axes(bound, args, kw)
    finally:
        _restore(methods, own)
        for t, value in saved:
            t.set_value(value)
    return outputs, free


_MISSING = object()


def _restore(layers: Dict[Tuple[str, str], nn.Layer], own: Dict[Tuple[str, str], Any]) -> None:
    """Put back what each layer's instance held under the method's name before (a forward set
    on the instance, `install_forwards`'), or nothing if it held nothing."""
    for key, layer in layers.items():
        if own[key] is _MISSING:
            layer.__dict__.pop(key[1], None)
        else:
            layer.__dict__[key[1]] = own[key]


def _same(a: Any, b: Any) -> bool:
    la, lb = _flat(a), _flat(b)
    if len(la) != len(lb):
        return False
    for x, y in zip(la, lb):
        if isinstance(x, paddle.Tensor) != isinstance(y, paddle.Tensor):
            return False
        if isinstance(x, paddle.Tensor):
            if list(x.shape) != list(y.shape) or x.dtype != y.dtype:
                return False
            if not bool((x.astype("float64") == y.astype("float64")).all()):
                return False
        elif isinstance(x, (int, float, str, bool)) and x != y:
            return False
    return True


def _replace(tree: Any, index: int, value: Any, counter: List[int]) -> Any:
    """`tree` with its `index`-th leaf (in `_flat` order) replaced."""
    if isinstance(tree, dict):
        return {k: _replace(v, index, value, counter) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_replace(v, index, value, counter) for v in tree)
    counter[0] += 1
    return value if counter[0] - 1 == index else tree


def _degenerate(result: Any) -> bool:
    """A result that could not show a dependence on values: its tensors are all empty or all
    zeros (an NMS that kept nothing, a loss with no positive sample). A constant stand-in (a
    dummy box) is left to the random values, which change it."""
    tensors = [x for x in _flat(result) if isinstance(x, paddle.Tensor)]
    return bool(tensors) and all(not t.numpy().any() for t in tensors)


def _perturbed(leaf: paddle.Tensor, rng: np.random.Generator) -> List[paddle.Tensor]:
    """Values of `leaf`'s shape no thresholding can ignore: an affine map, and two draws of
    large random values (a local generator: the global seed is left alone)."""
    arr = leaf.numpy()
    scale = 10.0 * (float(np.abs(arr).max(initial=0.0)) + 1.0)
    noise = [rng.normal(0.0, scale, arr.shape).astype(arr.dtype) for _ in range(2)]
    return [leaf * 1.5 + 0.25] + [paddle.to_tensor(n) for n in noise]


def _free_axes(bound: Callable[..., Any], args: tuple, kw: dict) -> Dict[int, Set[int]]:
    """For each float tensor argument (by leaf index): the axes (from 1) along which removing
    the last index leaves the method's result bit for bit the same, provided changing the
    argument's values does too, to an affine map of them and to large random values (it reads
    only its shape, e.g. to lay out anchors). Anything else, a method that does not repeat
    itself, or one whose result is empty or constant here (nothing to see a dependence in),
    frees nothing."""
    tree = (list(args), dict(kw))

    def call(t: Any) -> Any:
        return bound(*t[0], **t[1])

    try:
        base = call(tree)
        if not _same(base, call(tree)) or _degenerate(base):
            return {}
    except Exception:  # noqa: BLE001  (their code: nothing is free)
        return {}
    rng = np.random.default_rng(0)
    out: Dict[int, Set[int]] = {}
    for i, leaf in enumerate(_flat(tree)):
        if not isinstance(leaf, paddle.Tensor) or not leaf.is_floating_point() or leaf.ndim < 2:
            continue
        try:
            if not all(_same(base, call(_replace(tree, i, v, [0])))
                       for v in _perturbed(leaf, rng)):
                continue
        except Exception:  # noqa: BLE001
            continue
        axes = set()
        for a in range(1, leaf.ndim):
            if leaf.shape[a] > 1:
                cut = paddle.slice(leaf, axes=[a], starts=[0], ends=[leaf.shape[a] - 1])
                try:
                    if _same(base, call(_replace(tree, i, cut, [0]))):
                        axes.add(a)
                except Exception:  # noqa: BLE001  (that size matters to it)
                    pass
        out[i] = axes
    return out


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
        for i, v in enumerate(_flat((list(args), dict(kwargs)))):
            if _is_value(v):
                record.inputs[v.id] = path
                record.leaf[v.id] = i
        return _zeros_like(example, record, path)
    return forward


@contextlib.contextmanager
def stubbed(net: nn.Layer, methods: Sequence[Tuple[str, str]], run: Callable[[], Any],
            record: StubRecord) -> Iterator[None]:
    """While inside, each (layer path, method) of `methods` is a stub (see the module
    docstring); `run` makes the eager forward whose outputs the stubs imitate."""
    layers = dict(net.named_sublayers())
    chosen = {key: layers[key[0]] for key in methods}
    own = {key: layer.__dict__.get(key[1], _MISSING) for key, layer in chosen.items()}
    try:
        examples, free = _capture(net, chosen, run) if chosen else ({}, {})
    except Exception as e:  # noqa: BLE001  (the eager forward itself fails: not a conversion)
        raise StubCaptureError(f"the eager forward the stubs imitate fails: {e}") from e
    for key, layer in chosen.items():
        what = key[0] if key[1] == "forward" else f"{key[0]}.{key[1]}()"
        for i, axes in free.get(key, {}).items():
            record.free_axes[(what, i)] = axes
        # not called on this forward: it reads nothing and returns None
        stub = _stub_forward(record, what, examples.get(key))
        layer.__dict__[key[1]] = types.MethodType(stub, layer)
    record.paths = [key[0] if key[1] == "forward" else f"{key[0]}.{key[1]}()" for key in methods]
    try:
        yield
    finally:
        _restore(chosen, own)


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
