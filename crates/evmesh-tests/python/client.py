"""A Python service on evmesh, from a client generated with grpcio-tools.

Usage: client.py PROTO_DIR NODE_ADDRESS
Generates stubs from PROTO_DIR into a temporary directory, registers a schema,
publishes an event with a JSON-free protobuf payload, reads it back through a
subscription, and prints one JSON line with what it saw.
"""

import json
import os
import sys
import tempfile

from grpc_tools import protoc
import grpc


def generate(proto_dir, out_dir):
    import grpc_tools

    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    files = [
        os.path.join("evmesh", "v1", name)
        for name in ("envelope.proto", "mesh.proto", "registry.proto")
    ]
    code = protoc.main(
        ["protoc", f"-I{proto_dir}", f"-I{well_known}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}"]
        + files
    )
    if code != 0:
        raise SystemExit(f"grpc_tools.protoc failed with {code}")
    with open(os.path.join(out_dir, "shop.proto"), "w") as f:
        f.write('syntax = "proto3";\npackage pyshop.v1;\nmessage OrderPlaced { string order_id = 1; int64 total_cents = 2; }\n')
    code = protoc.main(["protoc", f"-I{out_dir}", f"--python_out={out_dir}", f"--descriptor_set_out={out_dir}/shop.bin", "--include_imports", "shop.proto"])
    if code != 0:
        raise SystemExit(f"grpc_tools.protoc failed on shop.proto with {code}")


def main():
    proto_dir, address = sys.argv[1], sys.argv[2]
    out = tempfile.mkdtemp()
    generate(proto_dir, out)
    sys.path.insert(0, out)
    from evmesh.v1 import envelope_pb2, mesh_pb2, mesh_pb2_grpc, registry_pb2, registry_pb2_grpc
    import shop_pb2

    channel = grpc.insecure_channel(address)
    registry = registry_pb2_grpc.SchemaRegistryStub(channel)
    mesh = mesh_pb2_grpc.MeshStub(channel)

    with open(os.path.join(out, "shop.bin"), "rb") as f:
        descriptors = f.read()
    registered = registry.RegisterSchema(
        registry_pb2.RegisterSchemaRequest(
            type="pyshop.order.placed", message_name="pyshop.v1.OrderPlaced", descriptor_set=descriptors
        )
    )

    event = envelope_pb2.Event(id="py-1", type="pyshop.order.placed", source="python", aggregate_id="o-py")
    event.payload.Pack(shop_pb2.OrderPlaced(order_id="o-py", total_cents=1234))
    # The streaming publish: the same event three times, one response each, in order.
    responses = list(mesh.Publish(iter([mesh_pb2.PublishRequest(event=event)] * 3)))
    acks = [r.ack for r in responses]

    def requests():
        yield mesh_pb2.SubscribeRequest(
            open=mesh_pb2.SubscribeOpen(
                patterns=["pyshop.>"], group="python-readers", start=mesh_pb2.StartPosition(earliest={})
            )
        )
        # Acks would follow here; this reader stops after one event.

    stream = mesh.Subscribe(requests())
    subscribed = next(stream).subscribed
    delivery = next(stream).delivery
    order = shop_pb2.OrderPlaced()
    delivery.event.payload.Unpack(order)
    stream.cancel()

    rejected = None
    try:
        mesh.PublishEvent(mesh_pb2.PublishRequest(event=envelope_pb2.Event(type="Bad Type")))
    except grpc.RpcError as e:
        rejected = {"code": e.code().name, "details": e.details()}

    print(json.dumps({
        "version": registered.schema.version,
        "sequences": [a.sequence for a in acks],
        "duplicates": [a.duplicate for a in acks],
        "group": subscribed.group,
        "order_id": order.order_id,
        "total_cents": order.total_cents,
        "schema_version": delivery.event.schema_version,
        "rejected": rejected,
    }))


if __name__ == "__main__":
    main()
