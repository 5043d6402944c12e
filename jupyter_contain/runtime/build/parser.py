"""Containerfile (Dockerfile) parsing and word expansion, with Docker's (BuildKit's) semantics.

Owns turning the text of a Containerfile into :class:`Instruction` records
(parser directives ``# syntax``/``# escape``/``# check``, comments, line
continuations with the escape character, heredocs ``<<[-]["']WORD["']``,
``--flag=value`` words, JSON exec form versus shell form) and the shell-like
word expansion the builder applies to most instructions (``$VAR``, ``${VAR}``,
``${VAR:-x}``, ``${VAR:+x}``, ``${VAR-x}``, ``${VAR+x}``, ``${VAR:?msg}``,
quotes and escapes, as moby/buildkit's ``shell`` lexer does). Pure: no I/O,
no image or container knowledge. Must not execute anything.

Every syntax error is a :class:`~jupyter_contain.errors.BuildError` naming the
file, the line and the instruction, raised before any build step runs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from ...errors import BuildError

#: instructions Docker knows (MAINTAINER is deprecated but still parsed)
INSTRUCTIONS = frozenset({
    "ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK", "LABEL",
    "MAINTAINER", "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR",
})
#: the flags each instruction accepts (anything else is a syntax error, as in BuildKit)
FLAGS: Mapping[str, frozenset[str]] = {
    "FROM": frozenset({"platform"}),
    "RUN": frozenset({"mount", "network", "security"}),
    "COPY": frozenset({"from", "chown", "chmod", "link", "parents", "exclude"}),
    "ADD": frozenset({"chown", "chmod", "link", "checksum", "keep-git-dir", "exclude"}),
    "HEALTHCHECK": frozenset({"interval", "timeout", "start-period", "start-interval", "retries"}),
}
#: flags that may be given more than once
_REPEATABLE = frozenset({"mount", "exclude"})
#: instructions whose arguments may carry heredocs
_HEREDOC_INSTRUCTIONS = frozenset({"RUN", "COPY", "ADD"})
#: the size of a Containerfile we read at all (BuildKit's limit is similar in spirit)
MAX_FILE_SIZE = 4 << 20

_DIRECTIVE_RE = re.compile(r"^#[ \t]*([a-zA-Z][a-zA-Z0-9]*)[ \t]*=[ \t]*(.+?)[ \t]*$")
_KNOWN_DIRECTIVES = frozenset({"syntax", "escape", "check"})
_HEREDOC_RE = re.compile(r"<<(-?)(['\"]?)([A-Za-z0-9_.\-]+)\2")
_NAME_START = re.compile(r"[A-Za-z_]")
_NAME_CHAR = re.compile(r"[A-Za-z0-9_]")


@dataclass(frozen=True)
class Heredoc:
    """One ``<<WORD`` body: its name, its content (with its final newline), and whether to expand it."""

    name: str
    content: str
    expand: bool = True
    chomp: bool = False   # ``<<-``: leading tabs were stripped


@dataclass(frozen=True)
class Instruction:
    """One instruction of a Containerfile, as written (expansion happens at build time)."""

    keyword: str                          # upper case: RUN, COPY, ...
    #: the argument text after the flags, continuations joined (shell form; JSON text for exec form)
    text: str
    line: int                             # 1-based line of its first line
    file: str = "Containerfile"
    flags: tuple[tuple[str, str | None], ...] = ()
    #: exec form (a JSON array of strings): the words; else None
    exec_form: tuple[str, ...] | None = None
    heredocs: tuple[Heredoc, ...] = ()
    #: the instruction as written (continuations joined, heredoc bodies left out): history, cache keys
    original: str = ""

    def flag(self, name: str) -> str | None:
        """The value of ``--name`` (the last one given), None if absent; ``--name`` alone is ``"true"``."""
        got = None
        for k, v in self.flags:
            if k == name:
                got = v if v is not None else "true"
        return got

    def flag_all(self, name: str) -> list[str]:
        return [v if v is not None else "true" for k, v in self.flags if k == name]

    def error(self, message: str) -> BuildError:
        return BuildError(message, file=self.file, line=self.line, instruction=self.keyword)


@dataclass(frozen=True)
class Containerfile:
    """A parsed Containerfile: its instructions and its parser directives."""

    instructions: tuple[Instruction, ...]
    escape: str = "\\"
    directives: Mapping[str, str] = field(default_factory=dict)
    file: str = "Containerfile"


# --- the parser ----------------------------------------------------------------------------------


def parse(text: str | bytes, *, file: str = "Containerfile") -> Containerfile:
    """Parse a Containerfile; raises :class:`BuildError` (file, line, instruction) on bad syntax."""
    if isinstance(text, bytes):
        if len(text) > MAX_FILE_SIZE:
            raise BuildError(f"the file is larger than {MAX_FILE_SIZE >> 20} MiB", file=file)
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BuildError(f"not UTF-8 text (byte {e.start})", file=file) from None
    text = text.removeprefix("\ufeff")   # a UTF-8 BOM, as Docker ignores it
    lines = text.split("\n")
    lines = [ln[:-1] if ln.endswith("\r") else ln for ln in lines]
    directives, first = _directives(lines, file)
    escape = directives.get("escape", "\\")
    out: list[Instruction] = []
    i = first
    n = len(lines)
    while i < n:
        raw = lines[i]
        start = i
        i += 1
        stripped = raw.lstrip(" \t")
        if not stripped or stripped.startswith("#"):
            continue
        logical, cont = _trim_continuation(stripped, escape)
        while cont and i < n:
            nxt = lines[i]
            i += 1
            s = nxt.lstrip(" \t")
            if s.startswith("#"):
                continue   # comment lines inside a continuation are dropped
            if not s.strip():
                continue   # empty continuation lines: deprecated, still accepted (Docker warns)
            part, cont = _trim_continuation(nxt, escape)
            logical += part
        keyword, rest = _split_keyword(logical)
        kw = keyword.upper()
        if kw not in INSTRUCTIONS:
            raise BuildError(f"unknown instruction {keyword!r}", file=file, line=start + 1, instruction=keyword)
        heredocs: list[Heredoc] = []
        if kw in _HEREDOC_INSTRUCTIONS or (kw == "ONBUILD" and _split_keyword(rest)[0].upper()
                                           in _HEREDOC_INSTRUCTIONS):
            for m in _heredoc_markers(rest, escape):
                chomp, quote, name = m
                body: list[str] = []
                while True:
                    if i >= n:
                        raise BuildError(f"heredoc <<{name} has no terminating line {name!r}", file=file,
                                         line=start + 1, instruction=kw)
                    ln = lines[i]
                    i += 1
                    check = ln.lstrip("\t") if chomp else ln
                    if check == name:
                        break
                    body.append(check)
                heredocs.append(Heredoc(name, "".join(b + "\n" for b in body), expand=not quote, chomp=chomp))
        out.append(_instruction(kw, rest, file=file, line=start + 1, escape=escape, heredocs=tuple(heredocs),
                                original=f"{kw} {rest}".rstrip()))
    return Containerfile(tuple(out), escape=escape, directives=directives, file=file)


def parse_instruction(text: str, *, file: str = "Containerfile", line: int = 0, escape: str = "\\") -> Instruction:
    """One instruction from one line (an ONBUILD trigger, a ``--change``-like string)."""
    keyword, rest = _split_keyword(text.strip())
    kw = keyword.upper()
    if kw not in INSTRUCTIONS:
        raise BuildError(f"unknown instruction {keyword!r}", file=file, line=line, instruction=keyword)
    return _instruction(kw, rest, file=file, line=line, escape=escape, heredocs=(), original=f"{kw} {rest}".rstrip())


def _split_keyword(logical: str) -> tuple[str, str]:
    s = logical.strip()
    m = re.match(r"(\S+)\s*(.*)\Z", s, re.S)
    if not m:
        return "", ""
    return m.group(1), m.group(2)


def _directives(lines: Sequence[str], file: str) -> tuple[dict[str, str], int]:
    """Parser directives at the top (``# name=value``): until the first other line, as Docker reads them."""
    found: dict[str, str] = {}
    i = 0
    for i, ln in enumerate(lines):
        m = _DIRECTIVE_RE.match(ln.strip())
        if not m:
            return found, i
        name, value = m.group(1).lower(), m.group(2)
        if name not in _KNOWN_DIRECTIVES:
            return found, i   # an unknown directive is a comment, and ends the directives
        if name in found:
            raise BuildError(f"only one {name} parser directive can be used", file=file, line=i + 1)
        if name == "escape" and value not in ("\\", "`"):
            raise BuildError(f"invalid escape token {value!r} does not match ` or \\", file=file, line=i + 1)
        found[name] = value
    return found, len(lines)


def _trim_continuation(line: str, escape: str) -> tuple[str, bool]:
    """Drop a trailing escape (and the blanks after it): (text, continues)."""
    s = line.rstrip(" \t")
    if s.endswith(escape):
        return s[:-1], True
    return line, False


def _heredoc_markers(rest: str, escape: str) -> list[tuple[bool, str, str]]:
    """The ``<<WORD`` markers of an instruction's text, outside quotes (chomp, quote, word)."""
    out = []
    in_single = in_double = False
    i = 0
    while i < len(rest):
        c = rest[i]
        if c == escape and not in_single:
            i += 2
            continue
        if c == "'" and not in_double:
            in_single = not in_single
        elif c == '"' and not in_single:
            in_double = not in_double
        elif c == "<" and not in_single and not in_double:
            m = _HEREDOC_RE.match(rest, i)
            if m and not (i > 0 and rest[i - 1] == "<"):   # <<< is a here-string, not a heredoc
                out.append((m.group(1) == "-", m.group(2), m.group(3)))
                i = m.end()
                continue
        i += 1
    return out


def _instruction(kw: str, rest: str, *, file: str, line: int, escape: str, heredocs: tuple[Heredoc, ...],
                 original: str) -> Instruction:
    def fail(msg: str) -> BuildError:
        return BuildError(msg, file=file, line=line, instruction=kw)

    flags: list[tuple[str, str | None]] = []
    allowed = FLAGS.get(kw, frozenset())
    body = rest
    while True:
        m = re.match(r"--([A-Za-z][A-Za-z0-9-]*)(?:=(\S*))?(?:\s+|\Z)", body)
        if body.startswith("-- ") or body == "--":
            body = body[2:].lstrip()
            break
        if not m:
            break
        name, value = m.group(1), m.group(2)
        if name not in allowed:
            raise fail(f"unknown flag: --{name}")
        if name not in _REPEATABLE and any(k == name for k, _ in flags):
            raise fail(f"duplicate flag specified: --{name}")
        flags.append((name, value))
        body = body[m.end():]
    exec_form: tuple[str, ...] | None = None
    if kw in ("RUN", "CMD", "ENTRYPOINT", "SHELL", "COPY", "ADD", "VOLUME") and body.lstrip().startswith("["):
        try:
            doc = json.loads(body)
        except ValueError:
            doc = None
        if isinstance(doc, list) and all(isinstance(w, str) for w in doc):
            exec_form = tuple(doc)
    if kw == "SHELL" and exec_form is None:
        raise fail("SHELL requires the arguments to be in JSON form")
    if kw in ("FROM", "WORKDIR", "USER", "STOPSIGNAL", "COPY", "ADD", "ARG", "ENV", "LABEL", "EXPOSE",
              "VOLUME", "MAINTAINER", "ONBUILD", "SHELL") and not body.strip() and not heredocs:
        raise fail(f"{kw} requires at least one argument")
    if kw == "ONBUILD":
        sub, _ = _split_keyword(body)
        if sub.upper() in ("ONBUILD", "FROM", "MAINTAINER"):
            raise fail(f"{sub.upper()} isn't allowed as an ONBUILD trigger")
        parse_instruction(body, file=file, line=line, escape=escape)   # the trigger must parse too
    if kw in ("COPY", "ADD") and exec_form is None and len(split_words(body, escape)) + len(heredocs) < 2 \
            and not heredocs:
        raise fail(f"{kw} requires at least two arguments, but only one was provided. Destination could not "
                   "be determined")
    return Instruction(keyword=kw, text=body, line=line, file=file, flags=tuple(flags), exec_form=exec_form,
                       heredocs=heredocs, original=original)


# --- words and key=value pairs -----------------------------------------------------------------


def split_words(text: str, escape: str = "\\") -> list[str]:
    """Split on blanks outside quotes, keeping quotes and escapes (expansion removes them later)."""
    words: list[str] = []
    cur: list[str] = []
    in_word = False
    quote = ""
    i = 0
    while i < len(text):
        c = text[i]
        if quote:
            cur.append(c)
            if c == escape and quote == '"' and i + 1 < len(text):
                cur.append(text[i + 1])
                i += 1
            elif c == quote:
                quote = ""
        elif c in " \t\n":
            if in_word:
                words.append("".join(cur))
                cur = []
                in_word = False
        else:
            in_word = True
            cur.append(c)
            if c == escape and i + 1 < len(text):
                cur.append(text[i + 1])
                i += 1
            elif c in "'\"":
                quote = c
        i += 1
    if in_word:
        words.append("".join(cur))
    return words


def parse_key_values(ins: Instruction, *, escape: str = "\\") -> list[tuple[str, str]]:
    """``KEY=VALUE ...`` (quotes kept for expansion) or the legacy ``KEY VALUE WITH SPACES`` form of ENV/LABEL."""
    words = split_words(ins.text, escape)
    if not words:
        raise ins.error(f"{ins.keyword} requires at least one argument")
    if "=" not in words[0]:
        # legacy form: one key, the rest of the line (after one run of blanks) is the value
        if ins.keyword not in ("ENV", "LABEL") or len(words) < 2:
            raise ins.error(f"{ins.keyword} names can not be blank" if not words[0] else
                            f"{ins.keyword} must have two arguments")
        value = re.split(r"[ \t]+", ins.text.strip(), maxsplit=1)[1]
        return [(words[0], value)]
    out = []
    for w in words:
        k, eq, v = w.partition("=")
        if not eq:
            raise ins.error(f"Syntax error - can't find = in {w!r}. Must be of the form: name=value")
        if not k:
            raise ins.error(f"{ins.keyword} names can not be blank")
        out.append((k, v))
    return out


# --- expansion -----------------------------------------------------------------------------------


class _Lexer:
    """The word processor of moby/buildkit's ``shell`` package, for what Dockerfiles use."""

    def __init__(self, word: str, env: Mapping[str, str], escape: str, fail: Callable[[str], BuildError],
                 used: set[str] | None) -> None:
        self.s = word
        self.i = 0
        self.env = env
        self.escape = escape
        self.fail = fail
        self.used = used

    def peek(self) -> str:
        return self.s[self.i] if self.i < len(self.s) else ""

    def next(self) -> str:
        c = self.peek()
        self.i += 1
        return c

    def word(self, stop: str = "") -> str:
        out: list[str] = []
        while self.i < len(self.s):
            c = self.peek()
            if stop and c in stop:
                break
            self.i += 1
            if c == self.escape:
                if self.i < len(self.s):
                    out.append(self.next())
                continue   # an escape at the end of the word is dropped
            if c == "'":
                out.append(self.single())
            elif c == '"':
                out.append(self.double())
            elif c == "$":
                out.append(self.dollar())
            else:
                out.append(c)
        return "".join(out)

    def single(self) -> str:
        end = self.s.find("'", self.i)
        if end < 0:
            raise self.fail("unexpected end of statement while looking for matching single-quote")
        out = self.s[self.i:end]
        self.i = end + 1
        return out

    def double(self) -> str:
        out: list[str] = []
        while True:
            if self.i >= len(self.s):
                raise self.fail("unexpected end of statement while looking for matching double-quote")
            c = self.next()
            if c == '"':
                return "".join(out)
            if c == self.escape:
                nxt = self.peek()
                if nxt in ('"', "$", self.escape) and nxt:
                    out.append(self.next())
                else:
                    out.append(c)
            elif c == "$":
                out.append(self.dollar())
            else:
                out.append(c)

    def _name(self) -> str:
        start = self.i
        while self.i < len(self.s) and _NAME_CHAR.match(self.s[self.i]):
            self.i += 1
        return self.s[start:self.i]

    def _lookup(self, name: str) -> str | None:
        if self.used is not None:
            self.used.add(name)
        return self.env.get(name)

    def dollar(self) -> str:
        c = self.peek()
        if c == "{":
            self.i += 1
            name = self._name()
            if not name:
                raise self.fail("bad substitution: a ${...} needs a variable name")
            op = self.peek()
            if op == "}":
                self.i += 1
                return self._lookup(name) or ""
            colon = op == ":"
            if colon:
                self.i += 1
                op = self.peek()
            if op not in ("-", "+", "?") and not colon and op in ("#", "%"):
                return self._pattern(name)
            if op not in ("-", "+", "?"):
                raise self.fail(f"unsupported modifier ({op or 'end of word'}) in substitution")
            self.i += 1
            arg = self._until_brace()
            value = self._lookup(name)
            missing = value is None or (colon and value == "")
            if op == "-":
                return arg if missing else value or ""
            if op == "+":
                return "" if missing else arg
            if missing:   # "?"
                raise self.fail(f"{name}: {arg or 'is not allowed to be unset'}")
            return value or ""
        if c and _NAME_START.match(c):
            return self._lookup(self._name()) or ""
        return "$"   # a lone dollar is literal

    def _until_brace(self) -> str:
        """The word inside ``${NAME:-word}``, expanded, up to its closing brace."""
        out: list[str] = []
        while True:
            if self.i >= len(self.s):
                raise self.fail("missing '}' in substitution")
            c = self.peek()
            if c == "}":
                self.i += 1
                return "".join(out)
            self.i += 1
            if c == self.escape and self.i < len(self.s):
                out.append(self.next())
            elif c == "'":
                out.append(self.single())
            elif c == '"':
                out.append(self.double())
            elif c == "$":
                out.append(self.dollar())
            else:
                out.append(c)

    def _pattern(self, name: str) -> str:
        """``${NAME#pat}``, ``##``, ``%``, ``%%``: prefix/suffix removal with glob patterns."""
        import fnmatch
        op = self.next()
        greedy = self.peek() == op
        if greedy:
            self.i += 1
        pat = self._until_brace()
        value = self._lookup(name) or ""
        rx = re.compile(fnmatch.translate(pat).removesuffix(r"\Z").removeprefix("(?s:").removesuffix(")") + r"\Z",
                        re.S) if pat else None
        if rx is None:
            return value
        idx = range(len(value) + 1)
        if op == "#":
            for k in (reversed(idx) if greedy else idx):
                if rx.match(value[:k]):
                    return value[k:]
        else:
            for k in (idx if greedy else reversed(idx)):
                if rx.match(value[k:]):
                    return value[:k]
        return value


def expand(word: str, env: Mapping[str, str], *, escape: str = "\\",
           fail: Callable[[str], BuildError] | None = None, used: set[str] | None = None) -> str:
    """Expand variables and remove quotes and escapes in one word (BuildKit's ``ProcessWord``).

    ``used`` collects the names looked up (the builder warns about build args never used).
    """
    def default_fail(msg: str) -> BuildError:
        return BuildError(msg)
    return _Lexer(word, env, escape, fail or default_fail, used).word()


def expand_words(text: str, env: Mapping[str, str], *, escape: str = "\\",
                 fail: Callable[[str], BuildError] | None = None, used: set[str] | None = None) -> list[str]:
    """Split ``text`` into words (blanks outside quotes) and expand each (BuildKit's ``ProcessWords``).

    A word that expands to nothing disappears, as an unquoted empty expansion does in a shell.
    """
    out = []
    for w in split_words(text, escape):
        e = expand(w, env, escape=escape, fail=fail, used=used)
        if e or any(q in w for q in "'\""):
            out.append(e)
    return out


def expand_heredoc(content: str, env: Mapping[str, str], *, escape: str = "\\",
                   fail: Callable[[str], BuildError] | None = None) -> str:
    """Expand ``$VAR`` in a heredoc body as a shell does for an unquoted delimiter (quotes stay)."""
    out: list[str] = []
    lx = _Lexer(content, env, escape, fail or (lambda m: BuildError(m)), None)
    while lx.i < len(content):
        c = lx.next()
        if c == escape and lx.peek() in ("$", escape):
            out.append(lx.next())
        elif c == "$":
            out.append(lx.dollar())
        else:
            out.append(c)
    return "".join(out)


__all__ = [
    "Containerfile", "FLAGS", "Heredoc", "INSTRUCTIONS", "Instruction", "expand", "expand_heredoc", "expand_words",
    "parse", "parse_instruction", "parse_key_values", "split_words",
]
