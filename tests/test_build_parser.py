"""The Containerfile parser and word expansion: Docker's (BuildKit's) rules, no I/O."""

from __future__ import annotations

import pytest

from jupyter_contain.errors import BuildError
from jupyter_contain.runtime.build.builder import plan
from jupyter_contain.runtime.build.context import IgnoreRules
from jupyter_contain.runtime.build.parser import expand, expand_words, parse, parse_key_values


def test_continuations_comments_and_case_are_docker_s():
    cf = parse("from busybox\nrun echo a && \\\n  # a comment inside\n\n  echo b\nCMD [\"sh\"]\n")
    kws = [i.keyword for i in cf.instructions]
    assert kws == ["FROM", "RUN", "CMD"]
    run = cf.instructions[1]
    assert run.text == "echo a &&   echo b"
    assert run.line == 2
    assert cf.instructions[2].exec_form == ("sh",)


def test_escape_directive_switches_to_backtick():
    cf = parse("# escape=`\nFROM scratch\nRUN dir c:\\ `\n  && echo x\n")
    assert cf.escape == "`"
    assert cf.instructions[1].text == "dir c:\\   && echo x"


def test_directives_stop_at_the_first_other_line():
    cf = parse("# syntax=docker/dockerfile:1\n\n# escape=`\nFROM scratch\n")
    assert cf.directives == {"syntax": "docker/dockerfile:1"}
    assert cf.escape == "\\"


def test_bad_escape_and_duplicate_directive_are_errors():
    with pytest.raises(BuildError, match="invalid escape token"):
        parse("# escape=x\nFROM scratch\n")
    with pytest.raises(BuildError, match="only one escape"):
        parse("# escape=`\n# escape=`\nFROM scratch\n")


def test_heredocs_keep_their_bodies_and_quoting():
    cf = parse("FROM scratch\nRUN <<EOF\necho $A\nEOF\nCOPY <<-'X' /f\n\tliteral $A\n\tX\nRUN true\n")
    run, copy, last = cf.instructions[1:]
    assert run.heredocs[0].content == "echo $A\n" and run.heredocs[0].expand
    assert copy.heredocs[0].content == "literal $A\n" and not copy.heredocs[0].expand
    assert last.text == "true" and last.line == 8


def test_unterminated_heredoc_names_the_line():
    with pytest.raises(BuildError, match=r"Containerfile:2: RUN: heredoc <<EOF has no terminating line"):
        parse("FROM scratch\nRUN <<EOF\necho\n")


def test_syntax_errors_name_file_line_and_instruction():
    with pytest.raises(BuildError, match=r"my.cf:3: FOO: unknown instruction 'FOO'"):
        parse("FROM scratch\n\nFOO bar\n", file="my.cf")
    with pytest.raises(BuildError, match=r":2: COPY: unknown flag: --bogus"):
        parse("FROM scratch\nCOPY --bogus=1 a b\n")
    with pytest.raises(BuildError, match=r":2: COPY: .*at least two arguments"):
        parse("FROM scratch\nCOPY onlyone\n")
    with pytest.raises(BuildError, match=r"SHELL requires the arguments to be in JSON form"):
        parse("FROM scratch\nSHELL /bin/bash -c\n")
    with pytest.raises(BuildError, match="duplicate flag"):
        parse("FROM scratch\nCOPY --chown=1 --chown=2 a b\n")


def test_flags_and_repeatable_mounts():
    ins = parse("FROM scratch\nRUN --mount=type=cache,target=/a --mount=type=tmpfs,target=/b --network=none ls\n"
                ).instructions[1]
    assert ins.flag_all("mount") == ["type=cache,target=/a", "type=tmpfs,target=/b"]
    assert ins.flag("network") == "none"
    assert ins.text == "ls"


def test_exec_form_falls_back_to_shell_form_when_json_is_bad():
    ins = parse("FROM scratch\nCMD [\"sh\", -c]\n").instructions[1]
    assert ins.exec_form is None and ins.text == '["sh", -c]'


def test_env_and_label_pairs_and_the_legacy_form():
    cf = parse('FROM scratch\nENV A=1 B="two words" C=\\$x\nENV LEGACY some value here\nLABEL "a b"=c\n')
    assert parse_key_values(cf.instructions[1]) == [("A", "1"), ("B", '"two words"'), ("C", "\\$x")]
    assert parse_key_values(cf.instructions[2]) == [("LEGACY", "some value here")]
    assert parse_key_values(cf.instructions[3]) == [('"a b"', "c")]


@pytest.mark.parametrize("word,want", [
    ("$A", "a"), ("${A}", "a"), ("${NOPE:-d}", "d"), ("${EMPTY:-d}", "d"), ("${EMPTY-d}", ""),
    ("${A:+set}", "set"), ("${NOPE:+set}", ""), ('"$A b"', "a b"), ("'$A'", "$A"), ("\\$A", "$A"),
    ('"\\$A"', "$A"), ('"a\\nb"', "a\\nb"), ("$", "$"), ("x${A}y", "xay"), ("${P%.tar.gz}", "dir/f"),
    ("${P##*/}", "f.tar.gz"), ("${P#*/}", "f.tar.gz"), ("${NOPE}", ""),
])
def test_expansion(word, want):
    env = {"A": "a", "EMPTY": "", "P": "dir/f.tar.gz"}
    assert expand(word, env) == want


def test_expansion_errors():
    with pytest.raises(BuildError, match="must be set"):
        expand("${X:?must be set}", {})
    with pytest.raises(BuildError, match="double-quote"):
        expand('"open', {})


def test_words_split_outside_quotes_and_empty_expansions_vanish():
    assert expand_words('a "b c" $E d', {"E": ""}) == ["a", "b c", "d"]


def test_plan_stages_targets_and_needed_stages():
    cf = parse("ARG V=1\nFROM busybox AS a\nRUN true\nFROM busybox AS unused\nRUN false\n"
               "FROM busybox AS b\nCOPY --from=a /x /y\n")
    p = plan(cf)
    assert [s.name for s in p.stages] == ["a", "unused", "b"]
    assert p.needed == (0, 2) and p.target == 2
    assert plan(cf, target="unused").needed == (1,)
    with pytest.raises(BuildError, match="target stage 'nope' could not be found"):
        plan(cf, target="nope")
    with pytest.raises(BuildError, match="first instruction must be FROM"):
        plan(parse("RUN true\nFROM busybox\n"))
    with pytest.raises(BuildError, match="--mount=type=secret is not supported"):
        plan(parse("FROM busybox\nRUN --mount=type=secret,id=x,target=/s true\n"))


def test_ignore_rules_follow_dockers_patternmatcher():
    rules = IgnoreRules.parse("# comment\n*.log\n!keep.log\nbuild/\n**/tmp\n/abs\n")
    assert rules.excluded("x.log")
    assert not rules.excluded("keep.log")
    assert rules.excluded("build") and rules.excluded("build/a/b")
    assert rules.excluded("a/b/tmp") and rules.excluded("tmp/x")
    assert rules.excluded("abs")
    assert not rules.excluded("sub/x.log")     # '*' does not cross '/'
    assert not rules.excluded("src/main.py")
