"""What ``restore --delete`` must never remove: the source's exclusions, as protect rules.

A backup leaves out what the source's ``exclude`` patterns and the automatic
exclusions (the engine's own folders) match, so a restored tree lacks those
files by design; ``--delete`` must keep them in the target. rsync's protect
rules (``--filter=P pattern``) do that on the receiving side only, so they
never change what is sent.

The patterns were written relative to the source's top. A restore of a
deeper item (``photos/2020``) runs rsync from the item's parent folder, so
patterns that look at the whole path are rewritten relative to that folder:
the rewritten rule matches ``x`` exactly when the original matches
``photos/x`` (a Brzozowski derivative of the glob by the literal prefix).
Matching follows rsync's filter rules: a leading ``/`` anchors at the
transfer's top, a pattern without ``/`` or ``**`` looks at the last name
only, one with an inner ``/`` at the path's last components, a trailing
``/`` matches folders only, ``*`` and ``?`` stop at ``/``, ``**`` does not,
``dir/***`` is ``dir`` and everything below it.
"""

from __future__ import annotations

from dataclasses import dataclass

_WILD = "*?["


@dataclass(frozen=True)
class _Tok:
    kind: str  # "lit" | "one" | "star" | "dstar" | "class"
    text: str = ""  # the literal character, or the class's source text
    negate: bool = False
    ranges: tuple[tuple[str, str], ...] = ()

    def takes(self, char: str) -> bool:
        if self.kind == "lit":
            return char == self.text
        if self.kind == "dstar":
            return True
        if char == "/":
            return False
        if self.kind == "class":
            inside = any(lo <= char <= hi for lo, hi in self.ranges)
            return inside != self.negate
        return True  # "one", "star"


@dataclass(frozen=True)
class Rule:
    """One exclusion pattern, parsed: anchored or not, folders only or not."""

    tokens: tuple[_Tok, ...]
    anchored: bool
    dir_only: bool

    @property
    def whole_path(self) -> bool:
        """Matched against the whole path, not the last name alone."""
        return self.anchored or any(t.kind == "dstar" or (t.kind == "lit" and t.text == "/")
                                    for t in self.tokens)

    def text(self) -> str:
        """The rule as an rsync pattern."""
        wild = any(t.kind != "lit" for t in self.tokens)
        body = "".join(_show(t, wild) for t in self.tokens)
        return ("/" if self.anchored else "") + body + ("/" if self.dir_only else "")


def _show(tok: _Tok, wild: bool) -> str:
    if tok.kind == "lit":
        return "\\" + tok.text if wild and tok.text in _WILD + "\\" else tok.text
    return {"one": "?", "star": "*", "dstar": "**"}.get(tok.kind, tok.text)


def _class(pattern: str, start: int) -> tuple[_Tok, int] | None:
    """The ``[...]`` at ``start``: the token and the index after it, None if unclosed."""
    i = start + 1
    negate = i < len(pattern) and pattern[i] in "!^"
    if negate:
        i += 1
    ranges: list[tuple[str, str]] = []
    first = True
    while i < len(pattern) and (first or pattern[i] != "]"):
        first = False
        char = pattern[i]
        if char == "\\" and i + 1 < len(pattern):
            i += 1
            char = pattern[i]
        if i + 2 < len(pattern) and pattern[i + 1] == "-" and pattern[i + 2] != "]":
            ranges.append((char, pattern[i + 2]))
            i += 3
        else:
            ranges.append((char, char))
            i += 1
    if i >= len(pattern):
        return None
    return _Tok("class", pattern[start:i + 1], negate, tuple(ranges)), i + 1


def _tokens(body: str) -> list[_Tok]:
    if not any(c in body for c in _WILD):
        return [_Tok("lit", c) for c in body]  # no wildcard: a backslash is itself
    toks: list[_Tok] = []
    i = 0
    while i < len(body):
        char = body[i]
        if char == "\\" and i + 1 < len(body):
            toks.append(_Tok("lit", body[i + 1]))
            i += 2
        elif char == "*":
            run = len(body[i:]) - len(body[i:].lstrip("*"))
            toks.append(_Tok("dstar" if run >= 2 else "star"))
            i += run
        elif char == "?":
            toks.append(_Tok("one"))
            i += 1
        elif char == "[" and (parsed := _class(body, i)) is not None:
            toks.append(parsed[0])
            i = parsed[1]
        else:
            toks.append(_Tok("lit", char))
            i += 1
    return toks


def parse_rules(pattern: str) -> list[Rule]:
    """``pattern`` as rules (``dir/***`` gives two: ``dir`` and ``dir/**``)."""
    anchored = pattern.startswith("/")
    body = pattern[1:] if anchored else pattern
    dir_only = body.endswith("/") and len(body) > 1
    if dir_only:
        body = body.rstrip("/")
    if body.endswith("/***"):
        stem = body[:-4]
        return [Rule(tuple(_tokens(stem)), anchored, False),
                Rule((*_tokens(stem), _Tok("lit", "/"), _Tok("dstar")), anchored, False)]
    return [Rule(tuple(_tokens(body)), anchored, dir_only)]


def _closure(tokens: tuple[_Tok, ...], states: set[int]) -> set[int]:
    out = set(states)
    todo = list(states)
    while todo:
        i = todo.pop()
        if i < len(tokens) and tokens[i].kind in ("star", "dstar") and i + 1 not in out:
            out.add(i + 1)
            todo.append(i + 1)
    return out


def _step(tokens: tuple[_Tok, ...], states: set[int], char: str) -> set[int]:
    nxt: set[int] = set()
    for i in states:
        if i < len(tokens) and tokens[i].takes(char):
            nxt.add(i if tokens[i].kind in ("star", "dstar") else i + 1)
    return _closure(tokens, nxt)


def _after(tokens: tuple[_Tok, ...], text: str) -> set[int]:
    """The pattern positions reachable after reading ``text`` from the start."""
    states = _closure(tokens, {0})
    for char in text:
        states = _step(tokens, states, char)
        if not states:
            break
    return states


def _full_match(rule: Rule, path: str) -> bool:
    return len(rule.tokens) in _after(rule.tokens, path)


def _starts(path: str) -> list[int]:
    """Where a component begins: the start, and after every ``/``."""
    return [0] + [i + 1 for i, c in enumerate(path) if c == "/"]


def matches(rule: Rule, path: str, is_dir: bool) -> bool:
    """Whether rsync's rule matches ``path`` (relative to the transfer's top)."""
    if rule.dir_only and not is_dir:
        return False
    if not rule.whole_path:
        return _full_match(rule, path.rsplit("/", 1)[-1])
    if rule.anchored:
        return _full_match(rule, path)
    return any(_full_match(rule, path[start:]) for start in _starts(path))


def relative_to(rule: Rule, prefix: str) -> list[Rule]:
    """Rules that match ``x`` where ``rule`` matches ``prefix + "/" + x``.

    ``prefix`` is the restored item's parent folder inside the source
    (``photos`` for ``photos/2020``); an empty prefix changes nothing.
    """
    if not prefix or not rule.whole_path:
        return [rule]
    lead = prefix.strip("/") + "/"
    out: list[Rule] = [] if rule.anchored else [rule]
    starts = [0] if rule.anchored else _starts(lead)[:-1]
    for start in starts:
        for i in sorted(_after(rule.tokens, lead[start:])):
            rest = rule.tokens[i:]
            # Nothing left: the rule matched a folder above the item (which
            # the backup cannot then hold); a leading "/" can never match.
            if rest and not (rest[0].kind == "lit" and rest[0].text == "/"):
                derived = Rule(rest, True, rule.dir_only)
                if derived not in out:
                    out.append(derived)
    return out


def covered(rules: list[Rule], path: str) -> bool:
    """Whether ``path`` (a folder) or a folder above it is matched by one of ``rules``."""
    parts = path.strip("/").split("/")
    for depth in range(1, len(parts) + 1):
        if any(matches(rule, "/".join(parts[:depth]), True) for rule in rules):
            return True
    return False


def exact_pattern(path: str) -> str:
    """An rsync pattern matching ``path`` (relative to the transfer's top) and nothing else.

    Anchored at the top. rsync compares a pattern without ``*``, ``?`` or
    ``[`` literally, backslashes and all; in one with any of them a
    backslash escapes the next character, so each of those and every
    backslash is escaped then.
    """
    if any(c in path for c in _WILD):
        path = "".join("\\" + c if c in _WILD + "\\" else c for c in path)
    return "/" + path
