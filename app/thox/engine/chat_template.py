"""Render chat messages to a prompt with the model's own Jinja chat template
(from the GGUF metadata), the way Hugging Face tokenizers do. Models without a
template get ChatML.

A template comes from a model file, so it is treated as hostile code: it runs
in Jinja's immutable sandbox, and every rendering is metered. The compiled
template counts steps (each loop iteration, call, filter and checked operator,
plus the size of what they build) against a budget and checks a wall-clock
deadline at each step; operators, calls and filters that can build a large
value in one C call are checked before they run; the output is streamed and
capped. A template that exceeds a budget aborts with ``ModelBroken`` and is
remembered, so later renderings fail at once. Callers run ``render`` off the
event loop.
"""

from __future__ import annotations

import json
import operator
import re
import threading
import time
from collections import OrderedDict
from datetime import datetime
from functools import lru_cache
from typing import Any, Callable

from jinja2 import Environment, TemplateError, TemplateSyntaxError
from jinja2 import nodes
from jinja2.compiler import CodeGenerator
from jinja2.ext import Extension
from jinja2.nodes import EvalContext
from jinja2.runtime import Context, LoopContext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import InvalidRequest, ModelBroken

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TOOL_SYSTEM = (
    "You may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}}\n</tool_call>"
)

# Budgets of one rendering. The 71 real models' templates in llama.cpp's
# collection take at most ~230 steps per message (Gemma 4's, with tool calls)
# and ~0.2 per character of text, and render as fast as in plain Jinja; the
# step budget is about ten times that.
DEADLINE_SECONDS = 5.0      # wall clock
BASE_STEPS = 200_000        # steps (loop iterations, calls, filters, operators) ...
STEPS_PER_ITEM = 2_000      # ... plus this many per message and per tool
STEPS_PER_CHAR = 2          # ... and per character of message text
CHARS_PER_STEP = 1024       # a string of n characters built costs n / CHARS_PER_STEP steps more,
ITEMS_PER_STEP = 16         # a list, tuple or dict of n items n / ITEMS_PER_STEP
MAX_TEMPLATE_CHARS = 128 << 10  # compiling is not metered: the source is bounded
SMALL_INPUT = (200, 256 << 10)  # messages+tools, characters: a deadline missed on so little is the template's
DEFAULT_MAX_CHARS = 4 << 20  # output and any single intermediate string or list
MAX_NUMBER = 10_000         # largest count or width passed to a call, filter or format spec
MAX_INT_BITS = 4096         # largest integer arithmetic may produce
MAX_INDENT = 16             # tojson indent
_BROKEN_KEEP = 64           # templates remembered as broken


class _Abort(BaseException):
    """Raised inside a rendering to stop it; a BaseException so that code the
    template runs cannot catch it with ``except Exception``. ``too_long``: the
    output or a value outgrew the size cap; ``late``: the deadline passed
    while the template was still within its step budget."""

    def __init__(self, why: str, *, too_long: bool = False, late: bool = False):
        super().__init__(why)
        self.why = why
        self.too_long = too_long
        self.late = late


class PromptTooLong(Exception):
    """The rendered prompt exceeds the output cap, and the messages are long
    enough to be the reason."""

    def __init__(self, n_chars: int):
        super().__init__(n_chars)
        self.n_chars = n_chars


class _Meter:
    """The budget of the rendering running on this thread."""

    def __init__(self, max_steps: int, max_chars: int):
        self.steps_left = max_steps
        self.max_chars = max_chars
        self.deadline = time.monotonic() + DEADLINE_SECONDS

    def step(self, n: int = 1) -> None:
        self.steps_left -= n
        if self.steps_left <= 0:
            raise _Abort("it ran too many steps (an endless or exponential loop?)")
        if time.monotonic() > self.deadline:
            raise _Abort(f"it ran longer than {DEADLINE_SECONDS:g} seconds", late=True)

    def size(self, value: Any, what: str) -> Any:
        """Charge for ``value`` and check its size."""
        if isinstance(value, (str, bytes, list, tuple, dict)):
            if len(value) > self.max_chars:
                raise _Abort(f"{what} built a value of {len(value)} items, over the limit of {self.max_chars}",
                             too_long=True)
            self.step(1 + len(value) // (CHARS_PER_STEP if isinstance(value, (str, bytes)) else ITEMS_PER_STEP))
        elif isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > MAX_INT_BITS:
            raise _Abort(f"{what} built an integer of {value.bit_length()} bits")
        else:
            self.step()
        return value

    def iterate(self, iterable: Any):
        """``iterable``, one step per item."""
        for item in iterable:
            self.step()
            yield item


class _Metered:
    """An iterable that charges a step per item; keeps the length of what it
    wraps, for ``loop.length``."""

    __slots__ = ("_source",)

    def __init__(self, source: Any):
        self._source = source

    def __len__(self) -> int:
        return len(self._source)

    def __iter__(self):
        return _meter().iterate(self._source)


_local = threading.local()


def _meter() -> _Meter:
    m = getattr(_local, "meter", None)
    if m is None:  # used outside render(): no budget to charge, but still bounded
        m = _local.meter = _Meter(BASE_STEPS, DEFAULT_MAX_CHARS)
    return m


def _number(v: Any, what: str) -> None:
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_NUMBER:
        raise _Abort(f"{what} got the number {v}, over the limit of {MAX_NUMBER}")


# widths and precisions in %-format and {}-format specifications
_PERCENT_SPEC = re.compile(r"%[#0\- +]*(\*|\d*)(?:\.(\*|\d*))?")
_BRACE_SPEC = re.compile(r"\{[^{}]*?:([^{}]*)\}")
_DIGITS = re.compile(r"\d+")


def _format_string(s: Any, args: tuple, what: str) -> None:
    """The widths and precisions a format string asks for stay small."""
    if not isinstance(s, str):
        return
    star = False
    for m in _PERCENT_SPEC.finditer(s):
        for g in m.groups():
            if g == "*":
                star = True
            elif g:
                _number(int(g), what)
    for m in _BRACE_SPEC.finditer(s):
        for d in _DIGITS.findall(m.group(1)):
            _number(int(d), what)
    if star:
        for v in args:
            _number(v, what)


# calls and filters that take a count or width
_COUNTED = frozenset(["center", "ljust", "rjust", "zfill", "expandtabs", "indent", "batch", "slice"])


def _estimate(name: str, target: Any, args: tuple, kwargs: dict) -> int:
    """An upper bound of the length of what a string operation returns."""
    if not isinstance(target, str):
        return 0
    n = len(target)
    if name in ("center", "ljust", "rjust", "zfill") and args and isinstance(args[0], int):
        return max(n, args[0])
    if name == "expandtabs":
        size = args[0] if args else kwargs.get("tabsize", 8)
        return n + target.count("\t") * size if isinstance(size, int) else n
    if name == "indent":
        width = args[0] if args else kwargs.get("width", 4)
        w = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
        return n + (target.count("\n") + 1) * w
    if name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        old, new = args[0], args[1]
        hits = target.count(old) if old else n + 1
        return n + max(0, len(new) - len(old)) * hits
    if name == "join" and args and isinstance(args[0], (list, tuple)):
        return n * len(args[0]) + sum(len(x) if isinstance(x, str) else 32 for x in args[0])
    return 0


def _check_call(name: str, target: Any, args: tuple, kwargs: dict) -> None:
    """What a call, filter or method is about to do stays within the budget."""
    m = _meter()
    for v in (*args, *kwargs.values()):
        m.size(v, name)
        if name in _COUNTED:
            _number(v, name)
    if name in ("format", "format_map"):
        _format_string(target, args, name)
    if _estimate(name, target, args, kwargs) > m.max_chars:
        raise _Abort(f"{name} would build a string over the limit of {m.max_chars}", too_long=True)


def _guard_filter(name: str, f: Callable) -> Callable:
    def guarded(*args: Any, **kwargs: Any) -> Any:
        # the filtered value is args[0] or, for context filters, args[1]
        plain = [a for a in args if not _is_jinja_internal(a)]
        target = plain[0] if plain else None
        _check_call(name, target, tuple(plain[1:]), kwargs)
        return _meter().size(f(*args, **kwargs), f"the filter {name}")
    for attr in ("jinja_pass_arg",):
        if hasattr(f, attr):
            setattr(guarded, attr, getattr(f, attr))
    guarded.__name__ = getattr(f, "__name__", name)
    return guarded


def _is_jinja_internal(v: Any) -> bool:
    return isinstance(v, (Context, EvalContext, Environment))


class _MeteredCodeGenerator(CodeGenerator):
    """Template code whose loops charge a step per item and whose ``~``
    concatenations are size-checked."""

    def visit_For(self, node, frame) -> None:
        node.iter = nodes.Call(nodes.EnvironmentAttribute("metered"), [node.iter], [], None, None)
        super().visit_For(node, frame)

    def visit_Concat(self, node, frame) -> None:
        self.write("environment.checked_concat(")
        super().visit_Concat(node, frame)
        self.write(")")


def _power(a: Any, b: Any) -> Any:
    if isinstance(a, int) and isinstance(b, int) and abs(a) > 1 and b > 0 and \
            a.bit_length() * b > MAX_INT_BITS:
        raise _Abort(f"{a} ** {b} is too large")
    return a ** b


def _modulo(a: Any, b: Any) -> Any:
    _format_string(a, b if isinstance(b, tuple) else (b,), "the % operator")
    return a % b


def _times(a: Any, b: Any) -> Any:
    for seq, k in ((a, b), (b, a)):
        if isinstance(seq, (str, list, tuple)) and isinstance(k, int) and len(seq) * k > _meter().max_chars:
            raise _Abort(f"the * operator would build a value of {len(seq) * k} items", too_long=True)
    return a * b


class MeteredSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox with budgets (see the module docstring)."""

    code_generator_class = _MeteredCodeGenerator
    intercepted_binops = frozenset(["*", "**", "%", "+"])
    _checked_ops: dict[str, Callable[[Any, Any], Any]] = {"*": _times, "**": _power, "%": _modulo,
                                                           "+": operator.add}

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.filters = {k: _guard_filter(k, f) for k, f in self.filters.items()}

    def call_binop(self, context, op: str, left: Any, right: Any) -> Any:
        fn = self._checked_ops.get(op)
        if fn is None:
            return super().call_binop(context, op, left, right)
        return _meter().size(fn(left, right), f"the {op} operator")

    def call(__self, __context, __obj, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 - jinja's signature
        name = getattr(__obj, "__name__", "")
        target = getattr(__obj, "__self__", None)
        if target is None:  # str.format comes wrapped by the sandbox
            target = getattr(getattr(__obj, "__wrapped__", None), "__self__", None)
        if isinstance(__obj, LoopContext) and args:  # a recursive loop's next level
            args = (_Metered(args[0]), *args[1:])
        elif __obj is not __self.globals.get("range"):  # range is lazy and bounded by the sandbox
            _check_call(name or "a call", target, args, {k: v for k, v in kwargs.items()
                                                         if not k.startswith("_")})
        return _meter().size(super().call(__context, __obj, *args, **kwargs), name or "a call")

    @staticmethod
    def metered(iterable: Any) -> _Metered:
        return _Metered(iterable)

    @staticmethod
    def checked_concat(value: str) -> str:
        return _meter().size(value, "the ~ operator")


class _Generation(Extension):
    """``{% generation %}...{% endgeneration %}``, which Hugging Face
    templates use to mark the assistant's part: rendered as its body."""

    tags = {"generation"}

    def parse(self, parser) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise(msg: str) -> None:
    raise TemplateError(msg)


def _tojson(v: Any, indent: int | None = None, ensure_ascii: bool = False, **_: Any) -> str:
    if indent is not None and (not isinstance(indent, int) or not 0 <= indent <= MAX_INDENT):
        raise _Abort(f"tojson got indent={indent!r}; at most {MAX_INDENT} is allowed")
    return json.dumps(v, indent=indent, ensure_ascii=ensure_ascii)


@lru_cache(maxsize=16)
def _compile(source: str):
    env = MeteredSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, "jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = _guard_filter("tojson", _tojson)
    return env.from_string(source)


_broken: OrderedDict[str, str] = OrderedDict()
_broken_lock = threading.Lock()


def broken_reason(template: str | None) -> str | None:
    """Why ``template`` was found broken by an earlier rendering, or None."""
    with _broken_lock:
        return _broken.get(template or CHATML)


def _mark_broken(source: str, why: str) -> str:
    with _broken_lock:
        _broken[source] = why
        _broken.move_to_end(source)
        while len(_broken) > _BROKEN_KEEP:
            _broken.popitem(last=False)
    return why


def render(template: str | None, messages: list[dict[str, Any]], *, tools: list[dict] | None,
           bos_token: str, eos_token: str, max_chars: int = DEFAULT_MAX_CHARS) -> str:
    """Prompt text for ``messages``. ``tools`` are OpenAI tool dicts; a
    template that does not know about tools gets them as a system message.

    Raises ``ModelBroken`` when the template exceeds its budget (then, and
    for later calls, without running it again), ``PromptTooLong`` when the
    output exceeds ``max_chars`` because the messages are long, and
    ``InvalidRequest`` when the template rejects the messages."""
    source = template or CHATML
    reason = broken_reason(source)
    if reason is not None:
        raise ModelBroken(f"the model's chat template is broken: {reason}", param="messages")
    msgs = [dict(m) for m in messages]
    template_knows_tools = "tools" in source
    if tools and not template_knows_tools:
        listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        block = TOOL_SYSTEM.format(tools=listing)
        if msgs and msgs[0]["role"] == "system":
            msgs[0]["content"] = msgs[0]["content"] + "\n\n" + block
        else:
            msgs.insert(0, {"role": "system", "content": block})
    if not template_knows_tools:
        msgs = [_plain(m) for m in msgs]
    input_chars = sum(len(m["content"]) if isinstance(m.get("content"), str) else 0 for m in msgs) + \
        (len(json.dumps(tools)) if tools else 0)
    items = len(msgs) + len(tools or [])
    meter = _Meter(BASE_STEPS + STEPS_PER_ITEM * items + STEPS_PER_CHAR * input_chars, max_chars)
    out: list[str] = []
    previous_meter = getattr(_local, "meter", None)
    _local.meter = meter
    size = 0
    try:
        if len(source) > MAX_TEMPLATE_CHARS:
            raise _Abort(f"it is {len(source)} characters long; the limit is {MAX_TEMPLATE_CHARS}")
        for piece in _compile(source).generate(messages=msgs, tools=tools or None, add_generation_prompt=True,
                                               bos_token=bos_token, eos_token=eos_token):
            size += len(piece)
            if size > max_chars:
                raise _Abort(f"its output exceeds {max_chars} characters", too_long=True)
            out.append(piece)
    except _Abort as e:
        if e.too_long and input_chars * 2 >= max_chars:
            raise PromptTooLong(max(size, max_chars + 1)) from None
        if e.late and (items > SMALL_INPUT[0] or input_chars > SMALL_INPUT[1]):
            # within its step budget on a large input: it is these messages that take so long
            raise InvalidRequest(f"the model's chat template took more than {DEADLINE_SECONDS:g} seconds to "
                                 f"render these {len(msgs)} messages; send fewer or shorter ones",
                                 param="messages") from None
        raise ModelBroken(f"the model's chat template is broken: {_mark_broken(source, e.why)}",
                          param="messages") from None
    except TemplateSyntaxError as e:
        raise ModelBroken(f"the model's chat template is broken: {_mark_broken(source, f'it does not parse: {e}')}",
                          param="messages") from None
    except TemplateError as e:
        raise InvalidRequest(f"the model's chat template rejected these messages: {e}",
                             param="messages") from None
    except RecursionError:
        raise ModelBroken(f"the model's chat template is broken: "
                          f"{_mark_broken(source, 'it recursed too deeply')}", param="messages") from None
    except (TypeError, ValueError, LookupError, AttributeError, ArithmeticError) as e:
        raise InvalidRequest(f"the model's chat template failed on these messages: {type(e).__name__}: {e}",
                             param="messages") from None
    finally:
        _local.meter = previous_meter
    return "".join(out)


def _plain(m: dict[str, Any]) -> dict[str, Any]:
    """Tool traffic as plain text, for templates without tool support."""
    if m.get("tool_calls"):
        calls = "\n".join("<tool_call>\n" + json.dumps({"name": c["function"]["name"],
                                                          "arguments": c["function"]["arguments"]},
                                                         ensure_ascii=False) + "\n</tool_call>"
                          for c in m["tool_calls"])
        return {"role": "assistant", "content": ((m.get("content") or "") + "\n" + calls).strip()}
    if m["role"] == "tool":
        return {"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"}
    return {"role": m["role"], "content": m.get("content") or ""}
