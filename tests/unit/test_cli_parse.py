"""Command line splitting, the first pass and the QemuOpts/JSON argument parsers."""

import re

import pytest

from vexport import cli
from vexport.errors import GenericError


def names(argv: list[str]) -> list[tuple[str, str | None, str]]:
    return [(o.name, o.arg, o.text) for o in cli.split_argv(argv)]


def test_split_long_options() -> None:
    assert names(["--blockdev", "null-co", "--export=vduse-blk,id=e", "--daemonize"]) == [
        ("blockdev", "null-co", "--blockdev null-co"),
        ("export", "vduse-blk,id=e", "--export=vduse-blk,id=e"),
        ("daemonize", None, "--daemonize"),
    ]
    # getopt_long takes the next word even when it looks like an option
    assert names(["--pidfile", "--object"]) == [("pidfile", "--object", "--pidfile --object")]
    # unique prefixes, like QSD (--block, --ex)
    assert names(["--block", "x", "--ex=y"]) == [
        ("blockdev", "x", "--block x"),
        ("export", "y", "--ex=y"),
    ]


def test_split_short_options() -> None:
    assert names(["-hV"]) == [("help", None, "-hV"), ("version", None, "-hV")]
    assert names(["-Tx", "-T", "y"]) == [("trace", "x", "-Tx"), ("trace", "y", "-T y")]
    assert names(["foo", "--", "--bar"]) == [("", "foo", "foo"), ("", "--bar", "--bar")]


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["--bogus"], "unrecognized option '--bogus'"),
        (["-x"], "invalid option -- 'x'"),
        (["-T"], "option requires an argument -- 'T'"),
        (["--pidfile"], "option '--pidfile' requires an argument"),
        (["--blockdev"], "option '--blockdev' requires an argument"),
        (["--ex"], "option '--export' requires an argument"),
        (["--help=x"], "option '--help' doesn't allow an argument"),
        (["--daemonize=1"], "option '--daemonize' doesn't allow an argument"),
        (["--blockdev", "x", "--bogus", "-h"], "unrecognized option '--bogus'"),
    ],
)
def test_first_pass_errors(argv: list[str], error: str) -> None:
    with pytest.raises(cli.UsageError) as info:
        cli.first_pass(cli.split_argv(argv))
    assert str(info.value) == error


def test_first_pass_help_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(cli.ExitNow) as info:
        cli.first_pass(cli.split_argv(["-h", "--bogus"]))
    assert info.value.status == 0
    out = capsys.readouterr().out
    assert out.startswith("Usage: vexport [options]\n")
    for option in [
        "--blockdev",
        "--chardev",
        "--daemonize",
        "--export",
        "--monitor",
        "--nbd-server",
        "--object",
        "--pidfile",
        "-T, --trace",
        "-V, --version",
    ]:
        assert option in out
    with pytest.raises(cli.ExitNow):
        cli.first_pass(cli.split_argv(["--blockdev", "x", "-V"]))
    assert capsys.readouterr().out.startswith("vexport version ")


def test_first_pass_collects() -> None:
    first = cli.first_pass(cli.split_argv(["--blockdev", "x", "--pidfile", "p", "--daemonize"]))
    assert first.daemonize and first.pidfile == "p"
    first = cli.first_pass(cli.split_argv(["--blockdev", "x"]))
    assert not first.daemonize and first.pidfile is None


def test_chardev() -> None:
    assert cli.parse_chardev("socket,id=m,path=/tmp/a,,b,server=on,wait=off") == {
        "backend": "socket",
        "id": "m",
        "path": "/tmp/a,b",
        "server": True,
        "wait": False,
    }
    assert cli.parse_chardev("socket,id=m,host=localhost,port=4444,server=yes") == {
        "backend": "socket",
        "id": "m",
        "host": "localhost",
        "port": "4444",
        "server": True,
    }
    # deprecated short-form booleans
    assert cli.parse_chardev("socket,id=c,path=/x,server,nowait")["wait"] is False
    # repeated keys: the last wins
    assert cli.parse_chardev("socket,id=c,id=d,path=/x")["id"] == "d"


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("socket", "chardev: no id specified"),
        ("id=c", 'chardev: "c" missing backend'),
        ("bogus,id=c", "'bogus' is not a valid char driver name"),
        ("socket,id=c,path=/x,bogus=1", "Invalid parameter 'bogus'"),
        ("socket,id=c,path=/x,bogus", "Invalid parameter 'bogus'"),
        ("socket,id=c,path=/x,nobogus", "Invalid parameter 'bogus'"),
        ("socket,id=c,path=/x,nowait=on", "Invalid parameter 'nowait'"),
        ("socket,id=c,path=/x,server=maybe", "Parameter 'server' expects 'on' or 'off'"),
        ("socket,id=c,path=/x,server=on,wait=off,,x", "Parameter 'wait' expects 'on' or 'off'"),
        (
            "socket,id=1c,path=/x",
            "Parameter 'id' expects an identifier\n"
            "Identifiers consist of letters, digits, '-', '.', '_', starting with a letter.",
        ),
        ("socket,id=c,host=localhost", "chardev: socket: no port given"),
    ],
)
def test_chardev_errors(text: str, error: str) -> None:
    with pytest.raises(GenericError) as info:
        cli.parse_chardev(text)
    assert info.value.desc == error


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('{"driver":"null-co"', "JSON parse error, premature EOI"),
        ("{", "JSON parse error, premature EOI"),
        ('{"driver":"null-co"} {}', "Expecting at most one JSON value"),
        ('{"driver":"null-co"} x', "Expecting at most one JSON value"),
        ("{]", "JSON parse error, expecting value"),
        ('{"a":1,}', "JSON parse error, expecting value"),
    ],
)
def test_json_errors(text: str, error: str) -> None:
    with pytest.raises(GenericError) as info:
        cli.parse_option_arg("blockdev-add", text, "driver")
    assert info.value.desc == error


def test_option_arg_forms() -> None:
    want = {"driver": "null-co", "node-name": "a", "read-only": True}
    assert (
        cli.parse_option_arg("blockdev-add", "null-co,node-name=a,read-only=on", "driver") == want
    )
    assert (
        cli.parse_option_arg(
            "blockdev-add", '{"driver":"null-co","node-name":"a","read-only":true}', "driver"
        )
        == want
    )
    # JSON only when the very first character is "{"
    with pytest.raises(GenericError, match=re.escape("does not accept value ' {}'")):
        cli.parse_option_arg("blockdev-add", " {}", "driver")
    with pytest.raises(GenericError, match="expected: boolean"):
        cli.parse_option_arg("blockdev-add", '{"driver":"null-co","read-only":"on"}', "driver")


def test_object_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.parse_object_arg("help") is None
    assert capsys.readouterr().out == "List of user creatable objects:\n  iothread\n"
    assert cli.parse_object_arg("iothread,help") is None
    assert "poll-max-ns=<int>" in capsys.readouterr().out
    assert cli.parse_object_arg("iothread,id=io0,poll-max-ns=0x10") == {
        "qom-type": "iothread", "id": "io0", "poll-max-ns": 16}  # fmt: skip


def test_settle_heap_freezes_the_start_up_objects(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """After start-up the daemon hides its long-lived objects from the cyclic GC
    (VEXPORT_GC=default keeps the standard behaviour)."""
    import gc

    from vexport.cli import settle_heap

    gc.unfreeze()
    try:
        monkeypatch.setenv("VEXPORT_GC", "default")
        settle_heap()
        assert gc.get_freeze_count() == 0
        monkeypatch.delenv("VEXPORT_GC")
        settle_heap()
        assert gc.get_freeze_count() > 1000
    finally:
        gc.unfreeze()
