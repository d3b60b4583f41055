"""PEFT's ``alpha_pattern`` keys matched against module names as PEFT matches them, in bounded time.

PEFT (``peft/utils/other.py: get_pattern_key``) takes the first key, in the file's order, for which
``re.match(rf"(.*\\.)?({key})$", name)`` matches. A key comes from a file: through a backtracking engine such as
Python's ``re``, a key such as ``(a|a)+b`` takes time exponential in the name's length. So no key from a file runs
through one here. A key that is a module name (letters, digits, ``_``, ``-`` and ``.``, which matches any
character) is matched by that rule directly; any other key is compiled, within the same ``(.*\\.)?(...)$``, into a
small automaton (Thompson's construction) that is run without backtracking, its state sets cached as they are met
(a lazy DFA), so each character of a name costs one look-up once the automaton is warm. Python's own parser decides
which keys are regular expressions at all (compiling runs nothing); backreferences, lookarounds, inline flags and
atomic or possessive parts are refused, and so is anything beyond the bounds below.
"""

from __future__ import annotations

import re
import warnings

MAX_PATTERNS = 10_000  # keys in one alpha_pattern (at most one per adapted layer: PixArt-XL has about 600)
MAX_PATTERN_CHARS = 1_000  # characters in one key (module names are under 100)
MAX_PATTERN_STATES = 4_000  # automaton states of one key, counted repeats ({m,n}) written out
MAX_PATTERN_DEPTH = 50  # nested groups in one key
MAX_MATCH_WORK = 5_000_000  # steps for every key of a file against every module name of it (a few seconds at most)

_LITERAL = re.compile(r"[A-Za-z0-9_.\-]*")
_CHAR, _SPLIT, _START, _END, _END_STRICT, _MATCH = range(6)


class PatternError(ValueError):
    """Why a key cannot be used (the caller names the file and the key)."""


class _Budget:
    def __init__(self, limit: int):
        self.left = limit

    def spend(self, steps: int) -> None:
        self.left -= steps
        if self.left < 0:
            raise PatternError(
                f"matching its keys against the module names takes more than {MAX_MATCH_WORK:,} steps, pixart's "
                "bound; use fewer or simpler keys"
            )


def _category(letter: str):
    tests = {"d": str.isdecimal, "w": lambda c: c.isalnum() or c == "_", "s": str.isspace}
    test = tests[letter.lower()]
    return test if letter.islower() else (lambda c: not test(c))


class _Parser:
    """A recursive-descent parser of Python's regular-expression syntax, for the parts an automaton can run."""

    def __init__(self, text: str):
        self.text, self.at, self.depth = text, 0, 0

    def peek(self, ahead: int = 0) -> str:
        index = self.at + ahead
        return self.text[index] if index < len(self.text) else ""

    def take(self) -> str:
        char = self.peek()
        self.at += 1
        return char

    def regex(self):
        branches = [self.branch()]
        while self.peek() == "|":
            self.take()
            branches.append(self.branch())
        return ("alt", branches) if len(branches) > 1 else branches[0]

    def branch(self):
        pieces = []
        while self.peek() not in ("", "|", ")"):
            atom = self.atom()
            pieces.append(self.quantified(atom))
        return ("seq", pieces)

    def quantified(self, atom):
        while True:
            char = self.peek()
            if char in ("*", "+", "?"):
                self.take()
                low, high = {"*": (0, None), "+": (1, None), "?": (0, 1)}[char]
            elif char == "{" and (bounds := self._counted()) is not None:
                low, high = bounds
            else:
                return atom
            if self.peek() == "+":
                raise PatternError("a possessive repeat (*+, ++, ?+) is not supported")
            if self.peek() == "?":
                self.take()  # lazy: the same names match, only the match's extent differs
            atom = ("repeat", atom, low, high)

    def _counted(self):
        match = re.compile(r"\{(\d*)(,?)(\d*)\}").match(self.text, self.at)
        if match is None or (not match.group(1) and not match.group(3) and match.group(2)):
            return None  # not a repeat: Python reads "{" as itself
        if not match.group(1) and not match.group(2):
            return None
        self.at = match.end()
        low = int(match.group(1)) if match.group(1) else 0
        high = low if not match.group(2) else (int(match.group(3)) if match.group(3) else None)
        return low, high

    def atom(self):
        char = self.take()
        if char == "(":
            return self.group()
        if char == "[":
            return ("char", self.char_class())
        if char == ".":
            return ("char", lambda c: c != "\n")
        if char == "^":
            return ("assert", _START)
        if char == "$":
            return ("assert", _END)
        if char == "\\":
            return self.escape()
        return ("char", char.__eq__)

    def group(self):
        if self.peek() == "?":
            if self.text.startswith("?:", self.at):
                self.at += 2
            elif self.text.startswith("?P<", self.at):
                self.at = self.text.index(">", self.at) + 1
            else:
                raise PatternError("lookarounds, backreferences, comments and inline flags (?...) are not supported")
        self.depth += 1
        if self.depth > MAX_PATTERN_DEPTH:
            raise PatternError(f"it nests groups more than {MAX_PATTERN_DEPTH} deep")
        inner = self.regex()
        self.depth -= 1
        self.take()  # ")": Python's parser has checked the pattern is balanced
        return inner

    def escape(self):
        char = self.take()
        if char in "dDwWsS":
            return ("char", _category(char))
        if char == "A":
            return ("assert", _START)
        if char == "Z":
            return ("assert", _END_STRICT)
        return ("char", self._escaped_char(char).__eq__)

    def _escaped_char(self, char: str) -> str:
        if char in "ntrfva":
            return {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v", "a": "\a"}[char]
        if char == "x":
            digits = self.text[self.at : self.at + 2]
            self.at += 2
            return chr(int(digits, 16))
        if char.isalnum():
            raise PatternError(f"the escape \\{char} (a backreference, word boundary or code point) is not supported")
        return char

    def char_class(self):
        negate = self.peek() == "^"
        if negate:
            self.take()
        tests, first = [], True
        while first or self.peek() != "]":
            first = False
            char = self.take()
            if char == "\\":
                escaped = self.take()
                if escaped in "dDwWsS":
                    tests.append(_category(escaped))
                    continue
                char = self._escaped_char(escaped)
            if self.peek() == "-" and self.peek(1) not in ("]", ""):
                self.take()
                end = self.take()
                if end == "\\":
                    end = self._escaped_char(self.take())
                tests.append(lambda c, low=char, high=end: low <= c <= high)
            else:
                tests.append(char.__eq__)
        self.take()  # "]"
        return (lambda c: not any(test(c) for test in tests)) if negate else (lambda c: any(test(c) for test in tests))


class _Automaton:
    """The NFA of one whole pattern, run as ``re.match`` runs it: from the start of a name, to any end."""

    def __init__(self, pattern: str):
        self.kind: list[int] = []
        self.test: list = []
        self.out: list[list[int]] = []
        self._closures: dict = {}
        self._steps: dict = {}
        accept = self._state(_MATCH)
        self.start = self._compile(_Parser(pattern).regex(), accept)

    def _state(self, kind: int, test=None, out=()) -> int:
        if len(self.kind) >= MAX_PATTERN_STATES:
            raise PatternError(f"it makes more than {MAX_PATTERN_STATES:,} automaton states (counted repeats)")
        self.kind.append(kind)
        self.test.append(test)
        self.out.append(list(out))
        return len(self.kind) - 1

    def _compile(self, node, next_state: int) -> int:
        """The state that starts ``node``, continuing to ``next_state`` (built back to front, without recursion
        deeper than the pattern's nesting)."""
        kind = node[0]
        if kind == "char":
            return self._state(_CHAR, node[1], [next_state])
        if kind == "assert":
            return self._state(node[1], None, [next_state])
        if kind == "seq":
            for piece in reversed(node[1]):
                next_state = self._compile(piece, next_state)
            return next_state
        if kind == "alt":
            return self._state(_SPLIT, None, [self._compile(branch, next_state) for branch in node[1]])
        _, body, low, high = node
        if high is None:  # low copies, then a loop
            loop = self._state(_SPLIT, None, [next_state])
            self.out[loop].insert(0, self._compile(body, loop))
            state = loop
        else:  # low copies, then (high - low) nested optional copies
            state = next_state
            for _ in range(high - low):
                state = self._state(_SPLIT, None, [self._compile(body, state), next_state])
        for _ in range(low):
            state = self._compile(body, state)
        return state

    def _closure(self, states: frozenset, flags: tuple, budget: _Budget):
        """(the character-consuming states reachable without consuming, whether the match state is among them)."""
        key = (states, flags)
        found = self._closures.get(key)
        if found is not None:
            budget.spend(1)
            return found
        at_start, at_end, before_newline = flags
        seen, stack, consuming, matched = set(), list(states), [], False
        while stack:
            state = stack.pop()
            if state in seen:
                continue
            seen.add(state)
            kind = self.kind[state]
            passes = (
                kind == _SPLIT
                or (kind == _START and at_start)
                or (kind == _END and (at_end or before_newline))
                or (kind == _END_STRICT and at_end)
            )
            if kind == _CHAR:
                consuming.append(state)
            elif kind == _MATCH:
                matched = True
            elif passes:
                stack.extend(self.out[state])
        budget.spend(len(seen))
        found = self._closures[key] = (frozenset(consuming), matched)
        return found

    def matches(self, name: str, budget: _Budget) -> bool:
        states, length = frozenset([self.start]), len(name)
        for position in range(length + 1):
            flags = (position == 0, position == length, position == length - 1 and name.endswith("\n"))
            consuming, matched = self._closure(states, flags, budget)
            if matched:
                return True
            if position == length or not consuming:
                return False
            char = name[position]
            key = (consuming, char)
            states = self._steps.get(key)
            if states is None:
                budget.spend(len(consuming))
                states = frozenset(self.out[s][0] for s in consuming if self.test[s](char))
                self._steps[key] = states
        return False


class _Literal:
    """A key of letters, digits, ``_``, ``-`` and ``.``: PEFT's rule is then a fixed-length suffix at a dot (or the
    whole name), ``.`` in the key matching any character but a newline."""

    def __init__(self, key: str):
        self.key = key
        self.parts = [(offset, part) for offset, part in _pieces(key) if part]

    def matches(self, name: str, budget: _Budget) -> bool:
        budget.spend(1)
        ends = [len(name)] + ([len(name) - 1] if name.endswith("\n") else [])
        for end in ends:
            start = end - len(self.key)
            if start < 0 or (start > 0 and name[start - 1] != ".") or "\n" in name[:end]:
                continue
            if all(name.startswith(part, start + offset) for offset, part in self.parts):
                return True
        return False


def _pieces(key: str):
    offset = 0
    for part in key.split("."):
        yield offset, part
        offset += len(part) + 1


class PatternTable:
    """The keys of one file's alpha_pattern, in the file's order; ``lookup(name)`` is the value of the first key
    that matches ``name`` as PEFT matches it, or None. Raises PatternError for a key it will not run."""

    def __init__(self, patterns: dict):
        if len(patterns) > MAX_PATTERNS:
            raise PatternError(f"it has {len(patterns):,} keys, beyond the {MAX_PATTERNS:,} pixart reads")
        self.entries = []
        self.budget = _Budget(MAX_MATCH_WORK)
        for key, value in patterns.items():
            self.entries.append((key, _matcher(key), value))

    def lookup(self, name: str):
        for key, matcher, value in self.entries:
            try:
                if matcher.matches(name, self.budget):
                    return value
            except PatternError as error:
                raise PatternError(f"key {key!r}: {error}") from None
        return None


def _matcher(key):
    if not isinstance(key, str):
        raise PatternError(f"key {key!r} is not text")
    if len(key) > MAX_PATTERN_CHARS:
        raise PatternError(f"a key of {len(key):,} characters is beyond the {MAX_PATTERN_CHARS:,} pixart reads")
    if _LITERAL.fullmatch(key):
        return _Literal(key)
    pattern = rf"(.*\.)?({key})$"
    try:  # Python's own parser says whether it is a regular expression at all; compiling matches nothing
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            re.compile(pattern)
    except (re.error, OverflowError, RecursionError, ValueError) as error:
        raise PatternError(f"key {key!r} is not a regular expression ({error})") from None
    try:
        return _Automaton(pattern)
    except PatternError as error:
        raise PatternError(f"key {key!r}: {error}") from None
