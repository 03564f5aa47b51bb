#!/usr/bin/env python3
"""Writes the committed seed corpus, fuzz/corpus-seed/TARGET/*: small inputs that reach each
target's modes (the first byte picks the mode; see each target's opening comment). Re-run it
after changing a target's modes: `python3 fuzz/make-seeds.py`."""
import json, os, struct, zlib

HERE = os.path.dirname(os.path.abspath(__file__))
U1 = "3e11fa47-71ca-11e1-9e33-c80aa9429562"
U2 = "00000000-0000-0000-0000-000000000001"
FILL = bytes(range(1, 97))  # fields for the template modes


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def write(target, name, data):
    d = os.path.join(HERE, "corpus-seed", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def segment_header(gtids: str, epoch: int) -> bytes:
    text = gtids.encode()
    total = (64 + len(text) + 7) // 8 * 8
    h = b"TIDELOG\0" + struct.pack("<HHI", 2, 0b0111, total)
    h += struct.pack("<Q", 1) + bytes.fromhex(U1.replace("-", "")) + struct.pack("<q", 1_700_000_000_000_000)
    h += struct.pack("<II", len(text), 0) + struct.pack("<Q", epoch) + text
    h = h.ljust(total, b"\0")
    crc = crc32c(h)
    return h[:52] + struct.pack("<I", crc) + h[56:]


# decode: 0 raw frame/header, 1 framed payload, 2 edited valid record, 3 header with fixed CRC
write("decode", "header", b"\0" + segment_header(f"{U1}:1-5:7,{U2}:1-3", 0))
write("decode", "header-epoch", b"\3" + segment_header("", 42))
write("decode", "record", b"\2" + FILL[:24])
write("decode", "record-edited", b"\2" + FILL[:24] + bytes([5, 0xFF, 9, 0x10]))
write("decode", "framed", b"\1" + FILL[:40])

# gtid_set: 0 raw text, 1 tokens
write("gtid_set", "canonical", b"\x10" + f"{U1}:1-5:7-9,{U2}:1-3".encode())
write("gtid_set", "messy", b"\x08" + f" {U2}:3:1-2,\n{U1}:9:1-5:6 ".encode())
write("gtid_set", "max", b"\x00" + f"{U1}:1-18446744073709551615".encode())
write("gtid_set", "gtid", b"\x00" + f"{U1}:7".encode())
write("gtid_set", "tokens", bytes([1, 0, 4, 10, 6, 13, 4, 16, 7, 1, 4, 11]))

# messages: bit 0 template (else raw body), bit 7 response (else request); then the pick
for pick in range(14):
    write("messages", f"request-{pick}", bytes([1, pick]) + FILL)
for pick in range(16):
    write("messages", f"response-{pick}", bytes([0x81, pick]) + FILL)

# stream_frames: mode%3 0 raw, 1 request frames, 2 response frames; bit 7 decode as response
for pick in range(14):
    write("stream_frames", f"request-{pick}", bytes([1, 7, pick]) + FILL * 2)
for pick in range(16):
    write("stream_frames", f"response-{pick}", bytes([0x80 | 2, 13, pick]) + FILL * 2)
write("stream_frames", "oversized", bytes([0, 3]) + struct.pack("<IB", 1 << 20, 1))
write("stream_frames", "unknown-kind", bytes([0, 1]) + struct.pack("<IB", 4, 9) + b"abcd")

# hello: 0 raw, 1 framed Hello then edited
write("hello", "hello", b"\1" + b"t" * 40 + b"client".ljust(12) + struct.pack("<Q", 2))
write("hello", "hello-edited", b"\1" + FILL + bytes([0, 0, 0xFF]))
write("hello", "oversized", b"\0" + struct.pack("<IB", 4097, 1))
write("hello", "batch", b"\0" + struct.pack("<IB", 0, 2))

# bootstrap: 0 raw packed body, 1 chunk then edited, 2 responses, 3 requests
def packed(entries):
    return b"".join(struct.pack("<II", len(k), len(v)) + k + v for k, v in entries)

body = packed([(b"a", b"1"), (b"b", b"22"), (b"c", b"")])
write("bootstrap", "entries", bytes([0x08, 0x20]) + b"z" + bytes([16]) + body)  # to: "z"
write("bootstrap", "entries-open", bytes([0x00, 0x40]) + body)
write("bootstrap", "entries-bad", bytes([0x00, 0x40]) + struct.pack("<II", 0xFFFFFFFF, 1) + b"k")
write("bootstrap", "chunk", bytes([1]) + FILL)
for i, mode in enumerate([2, 6, 10]):
    write("bootstrap", f"response-{i}", bytes([mode]) + FILL)
for i, mode in enumerate([3, 7]):
    write("bootstrap", f"request-{i}", bytes([mode]) + FILL)

# checkpoint: 0 raw file, 1 template then edited
write("checkpoint", "file", b"\0" + json.dumps({"server_uuid": U1, "offset": 7, "gtids": f"{U1}:1-7", "epoch": 3}).encode())
write("checkpoint", "file-before-epochs", b"\0" + json.dumps({"server_uuid": U1, "offset": 7, "gtids": f"{U1}:1-7"}).encode())
write("checkpoint", "template", b"\1" + FILL)

# bootstrap_progress: 0 raw record, 1 template then edited
progress = {"server_uuid": U1, "after_offset": 42, "epoch": 5, "tree": "users", "key_hex": "00ff10",
            "tree_done": False, "trees_done": 2, "chunks": 7, "keys": 700, "bytes": 70000,
            "keys_estimate": 1000, "bytes_estimate": 100000, "records": 5, "resumes": 1}
write("bootstrap_progress", "record", b"\0" + json.dumps(progress).encode())
del progress["epoch"]
write("bootstrap_progress", "record-before-epochs", b"\0" + json.dumps(progress).encode())
write("bootstrap_progress", "template", b"\1" + FILL)

# connect_toml: the pipeline file's text as it is (no mode byte). A valid file per sink kind,
# both layouts, and broken ones (each mistake the parser names by line and key).
SRC = '[source]\nnode = "127.0.0.1:7400"\nsecrets = "./data/secrets"\nfrom = "bootstrap"\ntrees = ["users"]\n'
SINKS = {
    "postgres": 'kind = "postgres"\nurl = "postgres://postgres@127.0.0.1:5432/test"\nschema = "public"\n'
                'table = "{tree}"\nmethod = "copy"\ncolumns = { email = "/email" }\nconnect_timeout_ms = 5000\n',
    "redis": 'kind = "redis"\nurl = "redis://127.0.0.1:6379"\nkey = "app:{tree}:{key}"\n'
             'connect_timeout_ms = 5000\nresponse_timeout_ms = 5000\n',
    "nats": 'kind = "nats"\nurl = "nats://127.0.0.1:4222"\nstream = "TIDELINE"\nsubjects = ["tideline.>"]\n'
            'subject = "tideline.{tree}"\nper = "txn"\nduplicate_window_secs = 120\nack_timeout_ms = 5000\nmax_in_flight = 256\n',
    "webhook": 'kind = "webhook"\nurl = "http://127.0.0.1:8080/tideline"\nposition_file = "./data/webhook.position"\n'
               'format = "json"\nheaders = { Authorization = "Bearer s3cret" }\ntimeout_ms = 5000\n',
    "file": 'kind = "file"\npath = "./out/changes.jsonl"\nrotate_bytes = 1048576\n',
}
for kind, body in SINKS.items():
    write("connect_toml", f"top-{kind}", (SRC + "\n[sink]\n" + body).encode())
multi = ""
for i, (kind, body) in enumerate(SINKS.items()):
    multi += (f'[[pipeline]]\nname = "p-{kind}"\nbatch_changes = {1000 * (i + 1)}\nbatch_delay_ms = 20\n'
              f'[pipeline.source]\nnode = "127.0.0.1:7400"\nfrom = "{["earliest", "latest", "offset:7", "gtid:" + U1 + ":1-5", "bootstrap"][i]}"\n'
              f'prefix = "user:"\nops = ["put", "delete"]\ntimeout_ms = 2000\n[pipeline.sink]\n{body}\n')
write("connect_toml", "pipelines-all-kinds", multi.encode())
write("connect_toml", "inline-array", ('pipeline = [{ name = "a", source = { node = "h:1" }, '
                                       'sink = { kind = "file", path = "o.jsonl" } }]\n').encode())
BROKEN = {
    "unknown-key": SRC + '\n[sink]\nkind = "postgres"\nulr = "postgres://x"\n',
    "wrong-type": SRC + '\n[sink]\nkind = "redis"\nurl = "redis://x"\nconnect_timeout_ms = "soon"\n',
    "unknown-kind": SRC + '\n[sink]\nkind = "kafka"\n',
    "no-kind": SRC + '\n[sink]\nurl = "x"\n',
    "kind-not-string": SRC + '\n[sink]\nkind = 7\n',
    "sink-not-table": SRC + '\nsink = "file"\n',
    "no-source": '[sink]\nkind = "file"\npath = "o"\n',
    "no-sink": SRC,
    "both-layouts": SRC + '[sink]\nkind = "file"\npath = "o"\n[[pipeline]]\nname = "x"\n',
    "unnamed-pipeline": '[[pipeline]]\n[pipeline.source]\nnode = "h:1"\n[pipeline.sink]\nkind = "file"\npath = "o"\n',
    "duplicate-name": ('[[pipeline]]\nname = "a"\n[pipeline.source]\nnode = "h:1"\n[pipeline.sink]\nkind = "file"\npath = "o"\n') * 2,
    "bad-from": SRC.replace('"bootstrap"', '"offset:0"') + '[sink]\nkind = "file"\npath = "o"\n',
    "bad-gtid": SRC.replace('"bootstrap"', '"gtid:nonsense:1-"') + '[sink]\nkind = "file"\npath = "o"\n',
    "bad-op": SRC + 'ops = ["upsert"]\n[sink]\nkind = "file"\npath = "o"\n',
    "zero-batch": 'batch_changes = 0\n' + SRC + '[sink]\nkind = "file"\npath = "o"\n',
    "syntax": '[source\nnode = "h:1"\n',
    "unterminated": '[source]\nnode = "h:1\n',
    "empty": '',
    "pipeline-not-array": 'pipeline = 3\n',
}
for name, text in BROKEN.items():
    write("connect_toml", f"broken-{name}", text.encode())
