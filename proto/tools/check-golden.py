#!/usr/bin/env python3
"""Checks the golden vectors with an implementation that is not Vane's: Google's protobuf for
Python, with code protoc generates from proto/vane/v1/vane.proto (grpcio-tools ships protoc).

For every proto/testdata/*.hex: the 4-byte prefix is the body's length, the body parses as a
vane.v1.Frame, and protobuf writes the parsed frame back to exactly the same bytes. That is what
docs/PROTOCOL.md promises an implementation in any language. Prints one line per vector and
exits non-zero on any mismatch.
"""
import importlib
import pathlib
import subprocess
import sys
import tempfile

root = pathlib.Path(__file__).resolve().parents[1]
out = pathlib.Path(tempfile.mkdtemp(prefix="vane-golden-"))
subprocess.run(
    [sys.executable, "-m", "grpc_tools.protoc", f"-I{root}", f"--python_out={out}", "vane/v1/vane.proto"],
    check=True,
)
sys.path.insert(0, str(out))
vane = importlib.import_module("vane.v1.vane_pb2")

failed = 0
vectors = sorted((root / "testdata").glob("*.hex"))
for path in vectors:
    wire = bytes.fromhex(path.read_text().strip())
    length = int.from_bytes(wire[:4], "big")
    body = wire[4:]
    frame = vane.Frame()
    frame.ParseFromString(body)
    again = frame.SerializeToString(deterministic=True)
    ok = length == len(body) and again == body
    print(("ok  " if ok else "FAIL"), path.name, frame.WhichOneof("kind"), f"{len(body)} bytes")
    if not ok:
        failed += 1
        print("  golden: ", body.hex())
        print("  python: ", again.hex())
print(f"{len(vectors) - failed} passed, {failed} failed")
sys.exit(1 if failed or not vectors else 0)
