"""Datum wire format, LMDB round trips, metadata sidecar, crash recovery and mixing (no caffe needed)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import lmdb
import numpy as np
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from hcgen.data.lmdb_io import DatumWriter, MetadataTable, decode_datum, encode_datums, iter_lmdb, key_for, lmdb_count, read_lmdb, write_datums
from hcgen.data.mix import mix_lmdbs

REPO = Path(__file__).resolve().parents[2]


def _datum_class():
    """caffe.Datum built from a descriptor equal to caffe.proto's, so protobuf itself serializes it."""
    f = descriptor_pb2.FileDescriptorProto(name="datum_test.proto", package="caffe", syntax="proto2")
    m = f.message_type.add(name="Datum")
    T, L = descriptor_pb2.FieldDescriptorProto, descriptor_pb2.FieldDescriptorProto
    for name, number, kind, label in [
        ("channels", 1, T.TYPE_INT32, L.LABEL_OPTIONAL), ("height", 2, T.TYPE_INT32, L.LABEL_OPTIONAL),
        ("width", 3, T.TYPE_INT32, L.LABEL_OPTIONAL), ("data", 4, T.TYPE_BYTES, L.LABEL_OPTIONAL),
        ("label", 5, T.TYPE_INT32, L.LABEL_OPTIONAL), ("float_data", 6, T.TYPE_FLOAT, L.LABEL_REPEATED),
        ("encoded", 7, T.TYPE_BOOL, L.LABEL_OPTIONAL),
    ]:
        m.field.add(name=name, number=number, type=kind, label=label)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("caffe.Datum"))


Datum = _datum_class()


def _images(n, c=1, h=5, w=4, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, c, h, w), dtype=np.uint8), rng.integers(0, 10, n)


def test_datum_golden_bytes():
    """Golden bytes derived by hand from the protobuf wire format (tag = field_number << 3 | wire_type):

    channels=1 -> 08 01; height=2 -> 10 02; width=3 -> 18 03; data (field 4, length-delimited, 6 bytes)
    -> 22 06 00 01 02 03 04 05; label=0 -> 28 00 (proto2 writes a set field even when it is 0).
    A 1x28x28 MNIST digit: height/width 28 -> 10 1c / 18 1c, data length 784 = 0x310 -> varint 90 06.
    Label 300 -> varint ac 02; label -1 (int32) is sign-extended to 10 bytes ff..ff 01.
    """
    image = np.arange(6, dtype=np.uint8).reshape(1, 1, 2, 3)
    assert encode_datums(image, [0])[0] == bytes.fromhex("08 01 10 02 18 03 22 06 00 01 02 03 04 05 28 00")
    digit = np.zeros((1, 1, 28, 28), np.uint8)
    assert encode_datums(digit, [7])[0] == bytes.fromhex("08 01 10 1c 18 1c 22 90 06") + bytes(784) + b"\x28\x07"
    assert encode_datums(image, [300])[0].endswith(b"\x28\xac\x02")
    assert encode_datums(image, [-1])[0].endswith(b"\x28" + b"\xff" * 9 + b"\x01")


def test_datum_bytes_equal_protobuf_serialization():
    images, _ = _images(20, c=3, h=7, w=9)
    labels = np.array([0, 1, 9, 127, 128, 300, 2**31 - 1, -1, -(2**31)] + [5] * 11)
    for image, label, ours in zip(images, labels, encode_datums(images, labels)):
        d = Datum(channels=3, height=7, width=9, data=image.tobytes(), label=int(label))
        assert ours == d.SerializeToString()
        back = decode_datum(ours)
        assert (back.channels, back.height, back.width, back.data, back.label) == (3, 7, 9, image.tobytes(), label)


def test_decode_reads_fields_protobuf_may_write():
    d = Datum(label=4, float_data=[1.5, -2.0], encoded=True, channels=2)
    back = decode_datum(d.SerializeToString())
    assert back.float_data == (1.5, -2.0) and back.encoded and back.label == 4 and back.channels == 2
    with pytest.raises(ValueError, match="truncated Datum"):
        decode_datum(encode_datums(*_images(1))[0][:-5])


def test_round_trip_batches_and_map_growth(tmp_path):
    images, labels = _images(1000, c=3, h=8, w=8)
    path = tmp_path / "db"
    with DatumWriter(path, map_size=64 * 1024) as writer:  # far too small: must grow
        for start in range(0, 1000, 300):
            writer.write(images[start:start + 300], labels[start:start + 300])
        assert writer.next_key == "00001000"
    keys, back, back_labels = read_lmdb(path)
    assert keys == [key_for(i) for i in range(1000)] and keys[0] == "00000000"
    np.testing.assert_array_equal(back, images)
    np.testing.assert_array_equal(back_labels, labels)
    assert back.dtype == np.uint8 and back_labels.dtype == np.int64
    assert [len(k) for k, _, _ in iter_lmdb(path, batch_size=400)] == [400, 400, 200]
    assert write_datums(path, images[:10], labels[:10]) == 1010  # appends
    assert lmdb_count(path) == 1010 and lmdb_count(tmp_path / "absent") == 0


def test_reader_and_writer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no LMDB"):
        read_lmdb(tmp_path / "absent")
    with pytest.raises(ValueError, match="uint8"):
        encode_datums(np.zeros((1, 1, 2, 2), np.float32), [0])
    with pytest.raises(ValueError, match="int32"):
        encode_datums(np.zeros((1, 1, 2, 2), np.uint8), [2**31])
    bad = {
        "encoded image": Datum(channels=1, height=1, width=4, data=b"\x89PNG", encoded=True),
        "different shapes": Datum(channels=1, height=1, width=2, data=b"ab"),
        "float_data": Datum(channels=1, height=1, width=1, float_data=[0.5]),
    }
    for i, (message, datum) in enumerate(bad.items()):
        env = lmdb.open(str(tmp_path / str(i)))
        with env.begin(write=True) as txn:
            txn.put(b"00000000", Datum(channels=1, height=1, width=1, data=b"a").SerializeToString())
            txn.put(b"zzz", datum.SerializeToString())
        env.close()
        with pytest.raises(ValueError, match=message):
            read_lmdb(tmp_path / str(i))
    with pytest.raises(ValueError, match="not contiguous"):
        DatumWriter(tmp_path / "0")
    with pytest.raises(ValueError, match="not contiguous"):
        mix_lmdbs([tmp_path / "0"], tmp_path / "mixed", seed=0)
    with pytest.raises(FileNotFoundError, match="no LMDB"):
        mix_lmdbs([tmp_path / "absent"], tmp_path / "mixed", seed=0)


def test_metadata_table(tmp_path):
    images, labels = _images(6)
    with DatumWriter(tmp_path / "db", metadata_columns=["note", "pass"]) as writer:
        writer.write(images[:4], labels[:4], {"note": ["a,b", 'q"uote', "", "x"], "pass": [0.5, 1, 2, 3]})
        with pytest.raises(ValueError, match="newlines"):
            writer.write(images[4:], labels[4:], {"note": ["a\nb", "c"], "pass": [1, 2]})
        with pytest.raises(ValueError, match="exactly the columns"):
            writer.write(images[4:], labels[4:], {"note": ["a", "c"]})
        with pytest.raises(ValueError, match="metadata exactly"):
            writer.write(images[4:], labels[4:])
        assert writer.count == 4
    table = MetadataTable(tmp_path / "db" / "metadata.csv")
    rows = list(table.rows())
    assert [r["key"] for r in rows] == ["00000000", "00000001", "00000002", "00000003"]
    assert rows[0] == {"key": "00000000", "note": "a,b", "pass": "0.5"} and rows[1]["note"] == 'q"uote'
    assert table.get([3, 0, 7]) == [rows[3], rows[0], {}]
    with pytest.raises(ValueError, match="has columns"):
        DatumWriter(tmp_path / "db", metadata_columns=["other"])
    with pytest.raises(ValueError, match="pass metadata_columns"):
        DatumWriter(tmp_path / "db")


def test_reopen_reports_records_without_metadata_and_drops_extra_rows(tmp_path):
    images, labels = _images(9)
    path = tmp_path / "db"
    with DatumWriter(path, metadata_columns=["i"]) as writer:
        for s in range(0, 9, 3):
            writer.write(images[s:s + 3], labels[s:s + 3], {"i": list(range(s, s + 3))})
    csv_path = path / "metadata.csv"
    lines = csv_path.read_text().splitlines(keepends=True)
    # rows 6..8 lost, row 5 half written, plus a stray row beyond the LMDB
    csv_path.write_text("".join(lines[:6]) + lines[6][:4] + "")
    with DatumWriter(path, metadata_columns=["i"]) as writer:
        np.testing.assert_array_equal(writer.missing_metadata, [5, 6, 7, 8])
    csv_path.write_text("".join(lines) + "00000009,9\n00000010,10\n")
    with DatumWriter(path, metadata_columns=["i"]) as writer:
        assert len(writer.missing_metadata) == 0
    assert csv_path.read_text() == "".join(lines)


_CHILD = textwrap.dedent("""
    import os, sys, numpy as np
    from hcgen.data import lmdb_io
    path, mode = sys.argv[1], sys.argv[2]
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (100000, 1, 4, 4), dtype=np.uint8)
    if mode == "exit-between":  # die after the metadata append, before the 3rd batch's LMDB commit
        real, calls = lmdb_io.DatumWriter._put_batch, []
        def put(self, keys, values):
            calls.append(1)
            if len(calls) == 3:
                os._exit(3)
            real(self, keys, values)
        lmdb_io.DatumWriter._put_batch = put
    with lmdb_io.DatumWriter(path, metadata_columns=["source"]) as w:
        stop = int(sys.argv[3])
        while w.count < stop:
            s = w.count
            e = min(s + 100, stop)
            w.write(images[s:e], np.arange(s, e) % 10, {"source": list(range(s, e))})
            print(w.count, flush=True)
""")


def _run_child(path, mode, stop):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-c", _CHILD, str(path), mode, str(stop)], env=env,
                            stdout=subprocess.PIPE, text=True)


def _check_complete(path, stop):
    keys, images, labels = read_lmdb(path)
    expected = np.random.default_rng(0).integers(0, 256, (100000, 1, 4, 4), dtype=np.uint8)[:stop]
    assert keys == [key_for(i) for i in range(stop)]
    np.testing.assert_array_equal(images, expected)
    np.testing.assert_array_equal(labels, np.arange(stop) % 10)
    rows = list(MetadataTable(Path(path) / "metadata.csv").rows())
    assert [int(r["source"]) for r in rows] == list(range(stop)) and [r["key"] for r in rows] == keys


def test_crash_between_metadata_and_commit_then_resume(tmp_path):
    child = _run_child(tmp_path / "db", "exit-between", 1000)
    assert child.wait() == 3
    assert lmdb_count(tmp_path / "db") == 200
    assert len(list(MetadataTable(tmp_path / "db" / "metadata.csv").rows())) == 300  # one batch ahead
    assert _run_child(tmp_path / "db", "resume", 1000).wait() == 0
    _check_complete(tmp_path / "db", 1000)


def test_sigkill_mid_write_then_resume(tmp_path):
    child = _run_child(tmp_path / "db", "resume", 100000)
    for _ in range(5):  # let it commit a few batches, then kill it wherever it is
        child.stdout.readline()
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert 500 <= lmdb_count(tmp_path / "db") < 100000
    assert _run_child(tmp_path / "db", "resume", 3000).wait() == 0
    _check_complete(tmp_path / "db", 3000)


def _mixed(tmp_path, name, seed, **kw):
    out = tmp_path / name
    n = mix_lmdbs([tmp_path / "a", tmp_path / "b"], out, seed, chunk_size=7, **kw)
    return (n, *read_lmdb(out), list(MetadataTable(out / "metadata.csv").rows()))


@pytest.fixture
def two_sources(tmp_path):
    a, la = _images(30, seed=1)
    b, lb = _images(20, seed=2)
    with DatumWriter(tmp_path / "a", metadata_columns=["pass", "source_key"]) as w:
        w.write(a, la, {"pass": list(range(30)), "source_key": ["orig"] * 30})
    write_datums(tmp_path / "b", b, lb)
    return {("a", key_for(i)): (a[i], la[i]) for i in range(30)} | {("b", key_for(i)): (b[i], lb[i]) for i in range(20)}


def test_mix_keeps_every_record_once_deterministically(tmp_path, two_sources):
    n, keys, images, labels, rows = _mixed(tmp_path, "m1", seed=5)
    assert n == 50 and keys == [key_for(i) for i in range(50)]
    seen = [(Path(r["source_lmdb"]).name, r["source_key"]) for r in rows]
    assert sorted(seen) == sorted(two_sources)
    for (src, key), image, label in zip(seen, images, labels):
        np.testing.assert_array_equal(image, two_sources[src, key][0])
        assert label == two_sources[src, key][1]
    assert {r["parent_source_key"] for r in rows} == {"orig", ""}
    assert all(r["pass"] == str(int(r["source_key"])) for r in rows if r["source_lmdb"].endswith("a"))
    again = _mixed(tmp_path, "m2", seed=5)
    assert again[1] == keys and np.array_equal(again[2], images) and again[4] == rows
    other = _mixed(tmp_path, "m3", seed=6)
    assert [(r["source_lmdb"], r["source_key"]) for r in other[4]] != [(r["source_lmdb"], r["source_key"]) for r in rows]


def test_mix_include_and_resume(tmp_path, two_sources):
    include = lambda s, key, row: s == 1 or int(row["pass"]) % 2 == 0  # noqa: E731
    full = _mixed(tmp_path, "full", seed=1, include=include)
    assert full[0] == 35

    def crash(n):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        mix_lmdbs([tmp_path / "a", tmp_path / "b"], tmp_path / "part", 1, include=include, chunk_size=7, progress=crash)
    assert lmdb_count(tmp_path / "part") == 7
    resumed = _mixed(tmp_path, "part", seed=1, include=include)
    assert resumed[0] == 35 and np.array_equal(resumed[2], full[2]) and resumed[4] == full[4]
