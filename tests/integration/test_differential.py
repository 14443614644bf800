"""Differential tests: the same raw QMP sequences against qemu-storage-daemon 7.2 and vexport.

Each case is a list of raw messages sent on a fresh connection (negotiated first unless the
case is about negotiation).  Replies are compared by *shape* (keys, recursively; types of
scalars; the first element of lists) and, for errors, by class and exact description.
Values that legitimately differ (versions, file names, sizes) are not compared.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

Start = Callable[..., Any]


def shape(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"class", "desc"}:  # an error: compared exactly
            return dict(value)
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    if isinstance(value, bool) or value is None:
        return type(value).__name__
    if isinstance(value, int | float):
        return "number"
    return type(value).__name__


NULL = '{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"n0"}}'
DEL_NULL = '{"execute":"blockdev-del","arguments":{"node-name":"n0"}}'

# name -> (messages, negotiate first)
CASES: dict[str, tuple[list[str], bool]] = {
    "negotiation": (
        [
            '{"execute":"query-version","id":1}',
            '{"execute":"nope"}',
            '{"exec-oob":"query-version","id":2}',
            '{"execute":"qmp_capabilities","arguments":{"enable":["foo"]},"id":3}',
            '{"execute":"qmp_capabilities","arguments":{"enable":[1]}}',
            '{"execute":"qmp_capabilities","arguments":{"x":1}}',
            '{"execute":"qmp_capabilities","arguments":{"enable":["oob"]},"id":4}',
            '{"execute":"qmp_capabilities","id":5}',
            '{"exec-oob":"query-version","id":6}',
            '{"exec-oob":"nope","id":7}',
            '{"execute":"query-version","exec-oob":"query-version","id":8}',
        ],
        False,
    ),
    "envelope": (
        [
            "[1]",
            '"x"',
            '{"id":3}',
            '{"execute":1,"id":4}',
            '{"execute":"query-version","arguments":[],"id":"s"}',
            '{"execute":"query-version","foo":1,"id":null}',
            '{"execute":"query-version","id":{"a":[1,{}]}}',
            '{"execute":"nope","id":9}',
            '{"execute":"query-version","arguments":{"x":1},"id":6}',
            '{"exec-oob":"query-version","id":8}',
        ],
        True,
    ),
    "json-errors": (
        [
            '{"a" 1}',
            "[1 2]",
            "{1:2}",
            '{"a":1,}',
            '{"execute":"query-version","id":1,"id":2}',
            '"\\x" ',
            '"\\ud800"',
            "tru ",
            "}",
            "%",
            "{'execute':'query-version','id':'single'}",
        ],
        True,
    ),
    "objects": (
        [
            '{"execute":"object-add","arguments":{"qom-type":"iothread","id":"io0"}}',
            '{"execute":"object-add","arguments":{"qom-type":"iothread","id":"io0"}}',
            '{"execute":"object-add","arguments":{"qom-type":"iothread","id":"1x"}}',
            '{"execute":"object-add","arguments":{"qom-type":"iothread","id":"i","poll-max-ns":-1}}',
            '{"execute":"object-add","arguments":{"qom-type":"iothread","id":"i","poll-grow":"1"}}',
            '{"execute":"object-add","arguments":{"qom-type":"iothread","id":"i","bogus":1}}',
            '{"execute":"object-add","arguments":{"qom-type":"iothread"}}',
            '{"execute":"object-add","arguments":{"qom-type":"bogus","id":"x"}}',
            '{"execute":"object-add","arguments":{"qom-type":"iothread","id":"io1",'
            '"poll-max-ns":1,"poll-grow":2,"poll-shrink":3,"aio-max-batch":4}}',
            '{"execute":"object-del","arguments":{"id":"io0"}}',
            '{"execute":"object-del","arguments":{"id":"io0"}}',
            '{"execute":"object-del","arguments":{"id":"io1"}}',
            '{"execute":"object-del","arguments":{}}',
        ],
        True,
    ),
    "misc-args": (
        [
            '{"execute":"query-commands","arguments":{"x":1}}',
            '{"execute":"quit","arguments":{"x":1}}',
            '{"execute":"query-version","id":7}',
        ],
        True,
    ),
    "blockdev-null": (
        [
            NULL,
            NULL,
            '{"execute":"query-named-block-nodes"}',
            '{"execute":"block_resize","arguments":{"node-name":"n0","size":1048576}}',
            '{"execute":"block_resize","arguments":{"node-name":"nope","size":1048576}}',
            DEL_NULL,
            DEL_NULL,
            '{"execute":"query-named-block-nodes"}',
        ],
        True,
    ),
    "blockdev-errors": (
        [
            '{"execute":"blockdev-add","arguments":{"driver":"bogus","node-name":"x"}}',
            '{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"x","bogus":1}}',
            '{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"x","size":"1"}}',
            '{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"1x"}}',
            '{"execute":"blockdev-add","arguments":{"driver":"null-co"}}',
            '{"execute":"blockdev-add","arguments":{"driver":"file","node-name":"f",'
            '"filename":"/nonexistent/disk.img"}}',
            '{"execute":"blockdev-add","arguments":{"node-name":"x"}}',
            '{"execute":"blockdev-del","arguments":{"node-name":"nope"}}',
        ],
        True,
    ),
    "blockdev-file": (
        [
            '{"execute":"blockdev-add","arguments":{"driver":"file","node-name":"f0",'
            '"filename":"@IMG@"}}',
            '{"execute":"blockdev-add","arguments":{"driver":"raw","node-name":"r0","file":"f0"}}',
            '{"execute":"query-named-block-nodes"}',
            '{"execute":"blockdev-del","arguments":{"node-name":"f0"}}',
            '{"execute":"blockdev-del","arguments":{"node-name":"r0"}}',
            '{"execute":"blockdev-del","arguments":{"node-name":"f0"}}',
        ],
        True,
    ),
    "exports": (
        [
            '{"execute":"block-export-del","arguments":{"id":"nope"}}',
            '{"execute":"query-block-exports"}',
            '{"execute":"block-export-add","arguments":{"type":"vduse-blk","id":"e0",'
            '"node-name":"nope","name":"vx-diff"}}',
            '{"execute":"block-export-add","arguments":{"type":"vduse-blk","id":"1e",'
            '"node-name":"nope","name":"vx-diff"}}',
        ],
        True,
    ),
}


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("diff") / "disk.img"
    path.write_bytes(b"\0" * (1 << 20))
    return path


@pytest.fixture(scope="module")
def both(start_qsd_shared: Start, start_vexport_shared: Start) -> Iterator[tuple[Any, Any]]:
    yield start_qsd_shared(), start_vexport_shared()


def replay(proc: Any, messages: list[str], negotiate: bool) -> list[Any]:
    client = proc.raw()
    try:
        if negotiate:
            client.negotiate()
        out = []
        for message in messages:  # every message here gets exactly one reply
            client.send(message.encode())
            out.append([client.recv()])
        assert client.recv_until_quiet(0.05) == []
        return out
    finally:
        client.close()


@pytest.mark.parametrize("case", list(CASES))
def test_same_replies_as_qsd(both: tuple[Any, Any], case: str, image: Path) -> None:
    qsd, vx = both
    messages, negotiate = CASES[case]
    messages = [m.replace("@IMG@", str(image)) for m in messages]
    want = replay(qsd, messages, negotiate)
    got = replay(vx, messages, negotiate)
    for message, w, g in zip(messages, want, got, strict=True):
        assert [shape(r) for r in g] == [shape(r) for r in w], message
