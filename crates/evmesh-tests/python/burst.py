"""Bursts of small publishes from grpc-python, as fast as it sends them.

Usage: burst.py PROTO_DIR NODE_ADDRESS BURSTS EVENTS STREAMS
Generates stubs from PROTO_DIR, then BURSTS times opens STREAMS Publish streams at
once on one channel, each sending EVENTS small events (one HTTP/2 DATA frame per
message, as grpc-python sends them). Each stream leaves its acks unread for a
second first, with a small receive window, so that the node's replies wait, its
reader waits behind them, and the small frames pile up unread in the node, as when
a node falls behind; meanwhile a unary call goes over the same connection. Then
every ack is read. Prints one JSON line: the acks counted, the first rejections,
and every RPC error seen (code and details).
"""

import json
import os
import sys
import tempfile
import threading
import time

from grpc_tools import protoc
import grpc


def generate(proto_dir, out_dir):
    import grpc_tools

    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    files = [os.path.join("evmesh", "v1", name) for name in ("envelope.proto", "mesh.proto")]
    code = protoc.main(
        ["protoc", f"-I{proto_dir}", f"-I{well_known}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}"]
        + files
    )
    if code != 0:
        raise SystemExit(f"grpc_tools.protoc failed with {code}")


def main():
    proto_dir, address = sys.argv[1], sys.argv[2]
    bursts, events, streams = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    out = tempfile.mkdtemp()
    generate(proto_dir, out)
    sys.path.insert(0, out)
    from evmesh.v1 import envelope_pb2, mesh_pb2, mesh_pb2_grpc

    channel = grpc.insecure_channel(
        address, options=[("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 16 * 1024)]
    )
    mesh = mesh_pb2_grpc.MeshStub(channel)
    acks = 0
    rejected = []
    errors = []
    lock = threading.Lock()

    def burst(b, s):
        nonlocal acks
        def request(i):
            event = envelope_pb2.Event(type="burst.tick", source="py", aggregate_id=f"a{i % 16}")
            event.payload.type_url = "type.googleapis.com/burst.v1.Tick"
            event.payload.value = b"\x08\x01"
            return mesh_pb2.PublishRequest(event=event)

        try:
            n = 0
            replies = mesh.Publish(request(i) for i in range(events))
            time.sleep(1)
            try:
                mesh.ListGroups(mesh_pb2.ListGroupsRequest(), timeout=10)
            except grpc.RpcError as e:
                with lock:
                    errors.append({"burst": b, "stream": s, "unary": True, "code": e.code().name, "details": e.details()})
            for r in replies:
                if r.HasField("ack"):
                    n += 1
                elif len(rejected) < 3:
                    rejected.append(str(r))
            with lock:
                acks += n
        except grpc.RpcError as e:
            with lock:
                errors.append({"burst": b, "stream": s, "code": e.code().name, "details": e.details()})

    for b in range(bursts):
        threads = [threading.Thread(target=burst, args=(b, s)) for s in range(streams)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    print(json.dumps({"acks": acks, "rejected": rejected, "errors": errors}))


if __name__ == "__main__":
    main()
