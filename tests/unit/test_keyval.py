"""keyval parsing; expected texts observed from qemu-storage-daemon 7.2 --blockdev."""

import pytest

from vexport import keyval
from vexport.errors import GenericError


@pytest.mark.parametrize(
    ("text", "tree"),
    [
        ("driver=null-co,node-name=a", {"driver": "null-co", "node-name": "a"}),
        ("null-co,node-name=a", {"driver": "null-co", "node-name": "a"}),
        ("driver=null-co,,node-name=a", {"driver": "null-co,node-name=a"}),
        ("null-co,,x", {"driver": "null-co,x"}),
        ("null-co,node-name=a,", {"driver": "null-co", "node-name": "a"}),
        ("null-co,node-name=a,,", {"driver": "null-co", "node-name": "a,"}),
        ("null-co,node-name=a,,,", {"driver": "null-co", "node-name": "a,"}),
        ("null-co,node-name=a,node-name=b", {"driver": "null-co", "node-name": "b"}),
        ("null-co,node-name=a=b", {"driver": "null-co", "node-name": "a=b"}),
        (
            "null-co,cache.direct=on,cache.no-flush=off",
            {"driver": "null-co", "cache": {"direct": "on", "no-flush": "off"}},
        ),
        (
            "raw,file.driver=file,file.filename=/x",
            {"driver": "raw", "file": {"driver": "file", "filename": "/x"}},
        ),
        ("d,x.0=a,x.1=b", {"driver": "d", "x": ["a", "b"]}),
        ("d,x.1=b,x.0=a", {"driver": "d", "x": ["a", "b"]}),
        ("d,x.0.e=a,x.1.e=b", {"driver": "d", "x": [{"e": "a"}, {"e": "b"}]}),
        ("d,x.0=a,x.1.a=b", {"driver": "d", "x": ["a", {"a": "b"}]}),
        ("d,x.0.0=1", {"driver": "d", "x": [["1"]]}),
        ("d,x.a0=1", {"driver": "d", "x": {"a0": "1"}}),
        ("d,__a.b_c=1", {"driver": "d", "__a.b_c": "1"}),
        ("d,__a_b.c=1", {"driver": "d", "__a_b": {"c": "1"}}),
        ("d,Ab=1,a-b=2,a_b=3", {"driver": "d", "Ab": "1", "a-b": "2", "a_b": "3"}),
        ("d,help=1", {"driver": "d", "help": "1"}),
        ("driver=", {"driver": ""}),
        ("", {}),
        ("d," + "a" * 127 + "=1", {"driver": "d", "a" * 127: "1"}),
    ],
)
def test_parse(text: str, tree: dict) -> None:
    assert keyval.parse(text, "driver") == tree


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("node-name=a,null-co", "Expected '=' after parameter 'null-co'"),
        ("driver=null-co,read-only", "Expected '=' after parameter 'read-only'"),
        ("null-co,x.help", "Expected '=' after parameter 'x.help'"),
        ("null-co,cache=1,cache.direct=on", "Parameters 'cache.*' used inconsistently"),
        ("null-co,cache.direct=on,cache=1", "Parameters 'cache.*' used inconsistently"),
        (
            "null-co,cache.direct=on,cache.direct.a=1",
            "Parameters 'cache.direct.*' used inconsistently",
        ),
        ("null-co,x.0=a,x.a=b", "Parameters 'x.*' used inconsistently"),
        ("null-co,x.a=a,x.0=b", "Parameters 'x.*' used inconsistently"),
        ("null-co,x.0=a,x.2=b", "Parameter 'x.1' missing"),
        ("null-co,x.1=a", "Parameter 'x.0' missing"),
        ("null-co,x.01=a", "Parameter 'x.0' missing"),
        ("null-co,x.1=a,x.01=b", "Parameter 'x.0' missing"),
        ("null-co,x.0.1=1", "Parameter 'x.0.0' missing"),
        ("null-co,x.99999999999999999999=1", "Parameter 'x.0' missing"),
        ("null-co,x.2147483647=1", "Parameter 'x.0' missing"),
        (",", "Invalid parameter ''"),
        ("=a", "Invalid parameter ''"),
        ("driver=null-co,=a", "Invalid parameter ''"),
        ("null-co,a..b=1", "Invalid parameter 'a..b'"),
        ("null-co,a.=1", "Invalid parameter 'a.'"),
        ("null-co,.a=1", "Invalid parameter '.a'"),
        ("null-co,a b=1", "Invalid parameter 'a b'"),
        ("null-co,1a=1", "Invalid parameter '1a'"),
        ("null-co,1=a", "Invalid parameter '1'"),
        ("null-co,x.0a=1", "Invalid parameter 'x.0a'"),
        ("null-co,x.1_=a", "Invalid parameter 'x.1_'"),
        ("null-co,x.-a=1", "Invalid parameter 'x.-a'"),
        ("null-co,x._a=1", "Invalid parameter 'x._a'"),
        ("null-co,x.+1=b", "Invalid parameter 'x.+1'"),
        ("null-co,_a=1", "Invalid parameter '_a'"),
        ("null-co,__a_=1", "Invalid parameter '__a_'"),
        ("null-co,__a_1=1", "Invalid parameter '__a_1'"),
        ("null-co," + "a" * 128 + "=1", "Parameter '" + "a" * 128 + "' is too long"),
        ("null-co,x." + "a" * 128 + "=1", "Parameter fragment '" + "a" * 128 + "' is too long"),
        ("driver=null-co,help", "Help is not available for this option"),
        ("help", "Help is not available for this option"),
        ("null-co,node-name=a,?", "Help is not available for this option"),
        ("null-co,x.1=a,?", "Help is not available for this option"),
        # parse errors come first, in order
        ("null-co,?,read-only", "Expected '=' after parameter 'read-only'"),
        ("null-co,read-only,?", "Expected '=' after parameter 'read-only'"),
    ],
)
def test_errors(text: str, error: str) -> None:
    with pytest.raises(GenericError) as info:
        keyval.parse(text, "driver")
    assert info.value.desc == error


def test_no_implied_key() -> None:
    with pytest.raises(GenericError, match="Expected '=' after parameter 'bogus'"):
        keyval.parse("bogus", None)
    assert keyval.parse("addr.type=unix", None) == {"addr": {"type": "unix"}}


def test_help() -> None:
    assert keyval.parse_with_help("help", "qom-type") == ({}, True)
    assert keyval.parse_with_help("iothread,bogus=1,help", "qom-type") == (
        {"qom-type": "iothread", "bogus": "1"},
        True,
    )
    assert keyval.parse_with_help("iothread,id=x", "qom-type") == (
        {"qom-type": "iothread", "id": "x"},
        False,
    )
    # with help, list errors still win (QSD: --object iothread,x.1=a,help)
    with pytest.raises(GenericError, match=r"Parameter 'x\.0' missing"):
        keyval.parse_with_help("iothread,x.1=a,help", "qom-type")
    with pytest.raises(GenericError, match="Expected '=' after parameter 'bogus'"):
        keyval.parse_with_help("help,bogus", "qom-type")
