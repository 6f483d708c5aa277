"""JSON schemas (``response_format``, forced tool calls) → GBNF grammars for
llama.cpp's grammar sampler, with bounded cost.

llama-cpp-python's converter writes a repetition ``{0,n}`` as ``n`` nested
groups, and llama.cpp parses nesting recursively: a large ``maxLength``
overflows the stack of the process. So before converting, the schema is
walked and its repetition counts (``minLength``/``maxLength``,
``minItems``/``maxItems``, ``{n,m}`` in ``pattern``), their sum and its size
are bounded; the conversion runs with a step budget, and its output is
bounded in size and nesting before llama.cpp parses it. All of this is CPU
work for a preparation thread (``Service.prepare``), not for the event loop.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any

from ..engine import llama
from ..errors import InvalidRequest

MAX_REPEAT = 1000            # any one repetition count
MAX_REPEAT_TOTAL = 10_000    # the sum over the schema
MAX_SCHEMA_NODES = 20_000    # objects, arrays and scalars in the schema
MAX_CONVERT_STEPS = 3_000_000
MAX_GRAMMAR_BYTES = 1 << 20
MAX_GRAMMAR_DEPTH = MAX_REPEAT + 200  # nested groups in the GBNF text

_COUNT_KEYS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties")
_QUANTIFIER = re.compile(r"(?<!\\)\{\s*(\d*)\s*(?:,\s*(\d*)\s*)?\}")


def _limit_error(param: str, where: str, what: str) -> InvalidRequest:
    return InvalidRequest(f"Invalid value for '{param}': {what} at '{where or '/'}' makes the grammar too large; "
                          f"repetition counts are limited to {MAX_REPEAT} each and {MAX_REPEAT_TOTAL} in "
                          f"total.", param=param, code="schema_too_large")


def check_schema(schema: Any, param: str) -> None:
    """Raise a 400 naming ``param`` when converting ``schema`` could build a
    grammar that is too large or too deeply nested. Walks without recursion."""
    total, nodes = 0, 0
    stack: list[tuple[Any, str]] = [(schema, "")]
    while stack:
        node, where = stack.pop()
        nodes += 1
        if nodes > MAX_SCHEMA_NODES:
            raise InvalidRequest(f"Invalid value for '{param}': the schema has more than {MAX_SCHEMA_NODES} "
                                 f"nodes.", param=param, code="schema_too_large")
        if isinstance(node, dict):
            for key in _COUNT_KEYS:
                v = node.get(key)
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    if not v <= MAX_REPEAT:
                        raise _limit_error(param, where, f"{key} {v}")
                    total += max(0, int(v))
            pattern = node.get("pattern")
            if isinstance(pattern, str):
                for m in _QUANTIFIER.finditer(pattern):
                    for g in m.groups():
                        if g and (len(g) > 9 or int(g) > MAX_REPEAT):
                            raise _limit_error(param, where, f"the quantifier {m.group()} in pattern")
                        if g:
                            total += int(g)
            if total > MAX_REPEAT_TOTAL:
                raise _limit_error(param, where, "the sum of repetition counts")
            stack.extend((v, f"{where}/{k}") for k, v in node.items())
        elif isinstance(node, list):
            stack.extend((v, f"{where}/{i}") for i, v in enumerate(node))


class _OutOfSteps(BaseException):
    pass


def _convert(schema: dict[str, Any]) -> str:
    steps = [MAX_CONVERT_STEPS]

    def trace(frame, event, arg):  # noqa: ARG001 - sys.settrace signature
        steps[0] -= 1
        if steps[0] <= 0:
            raise _OutOfSteps
        return trace

    previous = sys.gettrace()
    sys.settrace(trace)
    try:
        return llama.json_schema_to_gbnf(json.dumps(schema))
    finally:
        sys.settrace(previous)


def _nesting(grammar: str) -> int:
    """The deepest nesting of ( ) groups, outside literals and character classes."""
    bare = re.sub(r'"(?:[^"\\]|\\.)*"|\[(?:[^\]\\]|\\.)*\]', "", grammar)
    depth = deepest = 0
    for ch in re.sub(r"[^()]", "", bare):
        depth += 1 if ch == "(" else -1
        deepest = max(deepest, depth)
    return deepest


def schema_grammar(schema: dict[str, Any], param: str) -> str:
    """The GBNF grammar for ``schema``, or a 400 naming ``param``."""
    check_schema(schema, param)
    try:
        grammar = _convert(schema)
    except _OutOfSteps:
        raise InvalidRequest(f"Invalid value for '{param}': the schema is too complex to turn into a grammar.",
                             param=param, code="schema_too_large") from None
    except RecursionError:
        raise InvalidRequest(f"Invalid value for '{param}': the schema is nested too deeply.",
                             param=param, code="schema_too_large") from None
    except Exception as e:  # the converter raises assorted errors for schemas it cannot handle
        raise InvalidRequest(f"unsupported JSON schema: {e}", param=param) from None
    check_grammar_size(grammar, param)
    return grammar


def check_grammar_size(grammar: str, param: str) -> None:
    if len(grammar) > MAX_GRAMMAR_BYTES:
        raise InvalidRequest(f"Invalid value for '{param}': the schema makes a grammar of {len(grammar)} bytes; "
                             f"the limit is {MAX_GRAMMAR_BYTES}.", param=param, code="schema_too_large")
    if _nesting(grammar) > MAX_GRAMMAR_DEPTH:
        raise InvalidRequest(f"Invalid value for '{param}': the schema makes a grammar nested more than "
                             f"{MAX_GRAMMAR_DEPTH} levels deep.", param=param, code="schema_too_large")


def json_object_grammar() -> str:
    return llama.json_gbnf()


def tool_call_grammar(tools: list[tuple[int, dict[str, Any]]]) -> str:
    """Force output to be exactly one <tool_call>{json}</tool_call> for one of
    ``tools`` (pairs of the tool's index in the request and the tool)."""
    for i, t in tools:
        params = t["function"].get("parameters")
        if params is not None:
            check_schema(params, f"tools[{i}].function.parameters")
    variants = [{"type": "object",
                 "properties": {"name": {"const": t["function"]["name"]},
                                "arguments": t["function"].get("parameters") or {"type": "object"}},
                 "required": ["name", "arguments"]} for _, t in tools]
    schema = variants[0] if len(variants) == 1 else {"anyOf": variants}
    param = f"tools[{tools[0][0]}].function.parameters" if len(tools) == 1 else "tools"
    body = schema_grammar(schema, param).replace("root ::=", "toolcall ::=", 1)
    return 'root ::= "<tool_call>\\n" toolcall "\\n</tool_call>"\n' + body
