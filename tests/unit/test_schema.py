"""Schema validation and keyval typing; error texts observed from QSD 7.2."""

import json

import pytest

from vexport import keyval, schema
from vexport.errors import GenericError


def kv(name: str, text: str, implied: str | None) -> dict:
    return schema.from_keyval(name, keyval.parse(text, implied))


def kv_error(name: str, text: str, implied: str | None) -> str:
    with pytest.raises(GenericError) as info:
        kv(name, text, implied)
    return info.value.desc


def json_error(name: str, text: str) -> str:
    with pytest.raises(GenericError) as info:
        schema.validate(name, json.loads(text))
    return info.value.desc


def test_every_schema_loads_and_is_valid() -> None:
    names = schema.names()
    for expected in [
        "blockdev-add",
        "block-export-add",
        "object-add",
        "qmp_capabilities",
        "query-version",
        "quit",
        "block_resize",
        "nbd-server-start",
        "monitor",
    ]:
        assert expected in names
    for name in names:
        assert schema.load(name)["$schema"].startswith("https://json-schema.org/")


BLOCKDEV_KEYVAL = [
    ("null-co,size=abc", "Parameter 'size' expects integer"),
    ("null-co,size=1M", "Parameter 'size' expects integer"),
    ("null-co,node-name=a,size=10 ", "Parameter 'size' expects integer"),
    ("null-co,size=9223372036854775808", "Parameter 'size' expects integer"),
    ("null-co,node-name=a,size=1,size=abc", "Parameter 'size' expects integer"),
    ("raw,file.driver=null-co,file.size=x", "Parameter 'file.size' expects integer"),
    (
        "blkdebug,image=x,inject-error.0.event=read_aio,inject-error.1.state=1",
        "Parameter 'inject-error.1.event' is missing",
    ),
    (
        "blkdebug,image=x,inject-error.0.event=read_aio,inject-error.0.errno=x",
        "Parameter 'inject-error.0.errno' expects integer",
    ),
    (
        "blkdebug,image=x,inject-error=x",
        "Invalid parameter type for 'inject-error', expected: array",
    ),
    (
        "blkdebug,image=x,inject-error.0=x",
        "Invalid parameter type for 'inject-error.0', expected: object",
    ),
    (
        "blkdebug,image=x,inject-error.0.event=read_aio,inject-error.0.bogus=1",
        "Parameter 'inject-error.0.bogus' is unexpected",
    ),
    ("null-co,node-name=a,inject-error.0.event=x", "Parameter 'inject-error' is unexpected"),
    ("null-co,cache=on", "Invalid parameter type for 'cache', expected: object"),
    ("null-co,cache.direct=1", "Parameter 'cache.direct' expects 'on' or 'off'"),
    ("null-co,node-name=a,read-only=ON", "Parameter 'read-only' expects 'on' or 'off'"),
    ("null-co,node-name=x,cache.a.b=1", "Parameter 'cache.a' is unexpected"),
    ("null-co,a_b=1", "Parameter 'a_b' is unexpected"),
    ("null-co,x.a0=1", "Parameter 'x' is unexpected"),
    ("null-co,x.0.0=1", "Parameter 'x' is unexpected"),
    ("null-co,help=1", "Parameter 'help' is unexpected"),
    ("raw,file.driver=bogus", "Parameter 'driver' does not accept value 'bogus'"),
    ("null-co,node-name=a,discard=x", "Parameter 'discard' does not accept value 'x'"),
    ("", "Parameter 'driver' is missing"),
    ("driver=", "Parameter 'driver' does not accept value ''"),
    (
        "driver=null-co,,node-name=a",
        "Parameter 'driver' does not accept value 'null-co,node-name=a'",
    ),
    ("raw", "Parameter 'file' is missing"),
    ("null-co,node-name.a=1", "Parameters 'node-name.*' are unexpected"),
    # QSD aborts on these; vexport answers QEMU's own text instead
    ("null-co,size=-1,node-name=a", "Parameter 'size' expects a non-negative number below 2^64"),
    (
        "null-co,size=-9223372036854775808,node-name=a",
        "Parameter 'size' expects a non-negative number below 2^64",
    ),
    (
        "raw,file.driver=null-co,offset=-1,node-name=a",
        "Parameter 'offset' expects a non-negative number below 2^64",
    ),
    ("raw,file.driver=null-co,size=-1k,node-name=a", "Parameter 'size' expects integer"),
    ("null-co,latency-ns=-1,node-name=a", "latency-ns is invalid"),
    (
        "null-co,latency-ns=99999999999999999999,node-name=a",
        "Parameter 'latency-ns' expects integer",
    ),
]


@pytest.mark.parametrize(("text", "error"), BLOCKDEV_KEYVAL)
def test_blockdev_keyval_errors(text: str, error: str) -> None:
    assert kv_error("blockdev-add", text, "driver") == error


def test_blockdev_keyval_typing() -> None:
    assert kv("blockdev-add",
              "null-co,node-name=a,size=0x10,read-only=yes,cache.direct=true,force-share=no,"
              "latency-ns= 7,read-zeroes=off", "driver") == {
        "driver": "null-co", "node-name": "a", "size": 16, "read-only": True,
        "cache": {"direct": True}, "force-share": False, "latency-ns": 7, "read-zeroes": False,
    }  # fmt: skip
    assert kv("blockdev-add", "null-co,size=010", "driver")["size"] == 8
    assert kv("blockdev-add", "null-co,size=+10", "driver")["size"] == 10
    assert kv("blockdev-add", "null-co,size=0X10", "driver")["size"] == 16
    assert kv("blockdev-add", "raw,file=n,offset=512", "driver") == {
        "driver": "raw", "file": "n", "offset": 512}  # fmt: skip
    text = "raw,file.driver=file,file.filename=/x,file.aio=native"
    assert kv("blockdev-add", text, "driver") == {
        "driver": "raw", "file": {"driver": "file", "filename": "/x", "aio": "native"}}  # fmt: skip
    typed = kv("blockdev-add",
               "blkdebug,image=n,inject-error.0.event=read_aio,inject-error.0.errno=5,"
               "inject-error.0.once=on", "driver")  # fmt: skip
    assert typed["inject-error"] == [{"event": "read_aio", "errno": 5, "once": True}]


EXPORT_KEYVAL = [
    (
        "vduse-blk,id=e,node-name=n,name=v,num-queues=70000",
        "Parameter 'num-queues' expects uint16_t",
    ),
    ("vduse-blk,id=e,node-name=n,name=v,num-queues=-1", "Parameter 'num-queues' expects uint16_t"),
    (
        "vduse-blk,id=e,node-name=n,name=v,num-queues=0x10000",
        "Parameter 'num-queues' expects uint16_t",
    ),
    (
        "vduse-blk,id=e,node-name=n,name=v,num-queues=0200000",
        "Parameter 'num-queues' expects uint16_t",
    ),
    ("vduse-blk,id=e,node-name=n,name=v,num-queues=abc", "Parameter 'num-queues' expects integer"),
    ("vduse-blk,id=e,node-name=n,name=v,num-queues=08", "Parameter 'num-queues' expects integer"),
    (
        "vduse-blk,id=e,node-name=n,name=v,queue-size=65536",
        "Parameter 'queue-size' expects uint16_t",
    ),
    (
        "vduse-blk,id=e,node-name=n,name=v,logical-block-size=-1",
        "Parameter 'logical-block-size' expects size",
    ),
    (
        "vduse-blk,id=e,node-name=n,name=v,logical-block-size=4096e",
        "Parameter 'logical-block-size' expects size",
    ),
    (
        "vduse-blk,id=e,node-name=n,name=v,logical-block-size=1.5",
        "Parameter 'logical-block-size' expects size",
    ),
    (
        "vduse-blk,id=e,node-name=n,name=v,logical-block-size=16E",
        "Parameter 'logical-block-size' expects size",
    ),
    (
        "vduse-blk,id=e,node-name=n,name=v,logical-block-size=1e3",
        "Parameter 'logical-block-size' expects size",
    ),
    (
        "vduse-blk,id=e,node-name=n,name=v,logical-block-size=",
        "Parameter 'logical-block-size' expects size",
    ),
    (
        "vduse-blk,id=e,node-name=n,name=v,num-queues.a=1",
        "Parameters 'num-queues.*' are unexpected",
    ),
    ("vduse-blk,id=e,node-name=n,name.a=v", "Parameters 'name.*' are unexpected"),
    ("vduse-blk,id=e,node-name=n", "Parameter 'name' is missing"),
    ("vduse-blk,node-name=n", "Parameter 'id' is missing"),
    ("vduse-blk,id=e", "Parameter 'node-name' is missing"),
    ("id=e", "Parameter 'type' is missing"),
    ("bogus,id=e", "Parameter 'type' does not accept value 'bogus'"),
    ("vduse-blk,id=e,node-name=n,name=v,bogus=1", "Parameter 'bogus' is unexpected"),
    (
        "vduse-blk,id=e,node-name=n,name=v,writable=maybe",
        "Parameter 'writable' expects 'on' or 'off'",
    ),
    # QSD's order: the first error in declaration order, "unexpected" last
    ("vduse-blk,node-name=n,name=v,num-queues=abc", "Parameter 'id' is missing"),
    (
        "vduse-blk,id=e,node-name=n,name=v,num-queues=abc,writable=x",
        "Parameter 'writable' expects 'on' or 'off'",
    ),
    (
        "vduse-blk,id=e,node-name=n,name=v,bogus=1,writable=x",
        "Parameter 'writable' expects 'on' or 'off'",
    ),
    ("vduse-blk,id=e,node-name=n,bogus=1", "Parameter 'name' is missing"),
]


@pytest.mark.parametrize(("text", "error"), EXPORT_KEYVAL)
def test_export_keyval_errors(text: str, error: str) -> None:
    assert kv_error("block-export-add", text, "type") == error


@pytest.mark.parametrize(
    ("size", "value"),
    [("1.5k", 1536), ("0x200", 512), ("512b", 512), ("512B", 512), (" 512", 512),
     ("1K", 1024), ("+512", 512), ("0.5k", 512), ("010", 10), ("1M", 1 << 20),
     ("18446744073709551615", 2**64 - 1)],
)  # fmt: skip
def test_size_suffixes(size: str, value: int) -> None:
    typed = kv("block-export-add", f"vduse-blk,id=e,node-name=n,name=v,logical-block-size={size}",
               "type")  # fmt: skip
    assert typed["logical-block-size"] == value


def test_export_typing() -> None:
    assert kv("block-export-add",
              "vduse-blk,id=e,node-name=n,name=v,num-queues=0100000,writable=on,serial=s",
              "type") == {"type": "vduse-blk", "id": "e", "node-name": "n", "name": "v",
                          "num-queues": 32768, "writable": True, "serial": "s"}  # fmt: skip
    # accepted by the schema so that the export layer can refuse it
    assert kv("block-export-add", "nbd,id=e,node-name=n", "type")["type"] == "nbd"


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("iothread", "Parameter 'id' is missing"),
        ("id=x", "Parameter 'qom-type' is missing"),
        ("iothread,id=x,bogus=1", "Parameter 'bogus' is unexpected"),
        ("iothread,id=x,poll-max-ns=abc", "Parameter 'poll-max-ns' expects integer"),
        (
            "iothread,id=x,poll-max-ns=99999999999999999999",
            "Parameter 'poll-max-ns' expects integer",
        ),
        (
            "iothread,id=x,poll-max-ns=-1",
            "poll-max-ns value must be in range [0, 9223372036854775807]",
        ),
        (
            "iothread,id=x,poll-max-ns= -5",
            "poll-max-ns value must be in range [0, 9223372036854775807]",
        ),
        (
            "iothread,id=x,aio-max-batch=-5",
            "aio-max-batch value must be in range [0, 9223372036854775807]",
        ),
        ("bogus,id=x", "Parameter 'qom-type' does not accept value 'bogus'"),
    ],
)
def test_object_keyval_errors(text: str, error: str) -> None:
    assert kv_error("object-add", text, "qom-type") == error


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("x,bogus=1", "Parameter 'bogus' is unexpected"),
        ("", "Parameter 'chardev' is missing"),
        ("id=a", "Parameter 'chardev' is missing"),
        ("x,pretty=maybe", "Parameter 'pretty' expects 'on' or 'off'"),
    ],
)
def test_monitor_keyval_errors(text: str, error: str) -> None:
    assert kv_error("monitor", text, "chardev") == error


def test_nbd_server_keyval() -> None:
    assert kv_error("nbd-server", "addr.type=bogus", None) == (
        "Parameter 'type' does not accept value 'bogus'"
    )
    assert kv("nbd-server", "addr.type=unix,addr.path=/x,max-connections=2", None) == {
        "addr": {"type": "unix", "path": "/x"}, "max-connections": 2}  # fmt: skip


JSON_BLOCKDEV = [
    ('{"driver":"raw","file":5}', "Invalid parameter type for 'file', expected: BlockdevRef"),
    ('{"driver":"raw","file":{}}', "Parameter 'file.driver' is missing"),
    (
        '{"driver":"raw","file":{"driver":"null-co","size":"x"}}',
        "Invalid parameter type for 'file.size', expected: integer",
    ),
    (
        '{"driver":"raw","file":{"driver":"null-co","bogus":1}}',
        "Parameter 'file.bogus' is unexpected",
    ),
    (
        '{"driver":"raw","file":{"driver":"bogus"}}',
        "Parameter 'driver' does not accept value 'bogus'",
    ),
    ('{"driver":"raw"}', "Parameter 'file' is missing"),
    ('{"driver":5}', "Invalid parameter type for 'driver', expected: string"),
    (
        '{"driver":"null-co","cache":{"direct":1}}',
        "Invalid parameter type for 'cache.direct', expected: boolean",
    ),
    ('{"driver":"null-co","cache":[]}', "Invalid parameter type for 'cache', expected: object"),
    ('{"driver":"null-co","discard":"x"}', "Parameter 'discard' does not accept value 'x'"),
    ('{"driver":"null-co","discard":1}', "Invalid parameter type for 'discard', expected: string"),
    ('{"driver":"null-co","size":1.5}', "Invalid parameter type for 'size', expected: integer"),
    ('{"driver":"null-co","size":1.0}', "Invalid parameter type for 'size', expected: integer"),
    ('{"driver":"null-co","size":true}', "Invalid parameter type for 'size', expected: integer"),
    ('{"driver":"null-co","size":"1"}', "Invalid parameter type for 'size', expected: integer"),
    (
        '{"driver":"null-co","size":99999999999999999999}',
        "Invalid parameter type for 'size', expected: integer",
    ),
    (
        '{"driver":"null-co","read-only":"on"}',
        "Invalid parameter type for 'read-only', expected: boolean",
    ),
    (
        '{"driver":"null-co","node-name":null}',
        "Invalid parameter type for 'node-name', expected: string",
    ),
    (
        '{"driver":"null-co","bogus":1,"size":"x"}',
        "Invalid parameter type for 'size', expected: integer",
    ),
    ('{"bogus":1,"size":"x"}', "Parameter 'driver' is missing"),
    (
        '{"driver":"blkdebug","image":"x","inject-error":{}}',
        "Invalid parameter type for 'inject-error', expected: array",
    ),
    (
        '{"driver":"blkdebug","image":"x","inject-error":[{"event":"bogus"}]}',
        "Parameter 'event' does not accept value 'bogus'",
    ),
    (
        '{"driver":"blkdebug","image":"x","inject-error":[{"event":"read_aio"}, {}]}',
        "Parameter 'inject-error[1].event' is missing",
    ),
    (
        '{"driver":"null-co","size":-1,"node-name":"a"}',
        "Parameter 'size' expects a non-negative number below 2^64",
    ),
    (
        '{"driver":"raw","file":{"driver":"null-co"},"offset":-1,"node-name":"a"}',
        "Parameter 'offset' expects a non-negative number below 2^64",
    ),
    ('{"driver":"null-co","latency-ns":-1}', "latency-ns is invalid"),
]


@pytest.mark.parametrize(("text", "error"), JSON_BLOCKDEV)
def test_blockdev_json_errors(text: str, error: str) -> None:
    assert json_error("blockdev-add", text) == error


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ('"num-queues":70000', "Parameter 'num-queues' expects uint16_t"),
        ('"num-queues":-1', "Parameter 'num-queues' expects uint16_t"),
        ('"num-queues":1.0', "Parameter 'num-queues' expects uint64"),
        ('"logical-block-size":"1k"', "Parameter 'logical-block-size' expects uint64"),
        ('"logical-block-size":-1', "Parameter 'logical-block-size' expects uint64"),
        ('"writable":"on"', "Invalid parameter type for 'writable', expected: boolean"),
    ],
)
def test_export_json_errors(args: str, error: str) -> None:
    text = '{"type":"vduse-blk","id":"e","node-name":"n","name":"v",' + args + "}"
    assert json_error("block-export-add", text) == error


def test_commands_without_arguments() -> None:
    for name in ["query-version", "query-commands", "query-block-exports", "quit"]:
        assert schema.validate(name, {}) == {}
        assert json_error(name, '{"x": 1}') == "Parameter 'x' is unexpected"


def test_small_commands() -> None:
    assert schema.validate("qmp_capabilities", {"enable": ["oob"]}) == {"enable": ["oob"]}
    assert json_error("qmp_capabilities", '{"enable": ["x"]}').endswith("does not accept value 'x'")
    assert json_error("blockdev-del", "{}") == "Parameter 'node-name' is missing"
    assert json_error("block_resize", '{"node-name": "a"}') == "Parameter 'size' is missing"
    assert json_error("block_resize", '{"node-name": "a", "size": "1"}') == (
        "Invalid parameter type for 'size', expected: integer"
    )
    assert json_error("block-export-del", '{"id": "e", "mode": "x"}') == (
        "Parameter 'mode' does not accept value 'x'"
    )
    assert json_error("query-named-block-nodes", '{"flat": 1}') == (
        "Invalid parameter type for 'flat', expected: boolean"
    )
    assert json_error("object-del", "{}") == "Parameter 'id' is missing"
    assert json_error("object-add", '{"qom-type":"iothread","id":"x","poll-max-ns":"1"}') == (
        "Invalid parameter type for 'poll-max-ns', expected: integer"
    )
    assert json_error("object-add", '{"qom-type":"iothread"}') == "Parameter 'id' is missing"
    args = {"addr": {"type": "unix", "data": {"path": "/x"}}}
    assert schema.validate("nbd-server-start", args) == args


def test_valid_json_is_returned_unchanged() -> None:
    args = {"driver": "raw", "node-name": "r", "file": {"driver": "null-co", "size": 4096},
            "read-only": True, "cache": {"direct": False}}  # fmt: skip
    assert schema.validate("blockdev-add", args) is args


@pytest.mark.parametrize(
    ("text", "value"),
    [("0", 0), ("-0", 0), (" 12", 12), ("\t0x1f", 31), ("017", 15), ("+3", 3), ("-3", -3)],
)
def test_c_integers(text: str, value: int) -> None:
    assert schema.parse_c_integer(text, signed=True) == value


def test_c_integer_rejects() -> None:
    for text in ["", " ", "0x", "08", "1 ", "1.0", "abc", "9223372036854775808", "--1"]:
        assert schema.parse_c_integer(text, signed=True) is None, text
    assert schema.parse_c_integer("-1", signed=False) == 2**64 - 1
    assert schema.parse_c_integer("18446744073709551616", signed=False) is None
