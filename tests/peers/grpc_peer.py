"""A gRPC server and client for the observe tests, on Python's gRPC (python3-grpcio), with raw
bytes as messages so that no generated code is needed.

    grpc_peer.py serve ADDR          serves shop.Cart until killed; prints "serving" once bound
    grpc_peer.py call ADDR N         N calls of each method; prints the codes seen, as JSON
    grpc_peer.py hold ADDR N         one call, "ready", then N more on the same connection once
                                     a line comes on stdin; prints their codes, as JSON

shop.Cart/Get answers OK, shop.Cart/Missing fails NOT_FOUND, shop.Cart/List streams three
messages then OK.
"""
import json
import sys
from collections import Counter
from concurrent import futures

import grpc

METHODS = ("/shop.Cart/Get", "/shop.Cart/Missing", "/shop.Cart/List")


def get(request, context):
    return request[::-1]


def missing(request, context):
    context.abort(grpc.StatusCode.NOT_FOUND, "no such cart")


def listing(request, context):
    for i in range(3):
        yield bytes([i]) * 100


def serve(address):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    handlers = {
        "Get": grpc.unary_unary_rpc_method_handler(get),
        "Missing": grpc.unary_unary_rpc_method_handler(missing),
        "List": grpc.unary_stream_rpc_method_handler(listing),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("shop.Cart", handlers),))
    if server.add_insecure_port(address) == 0:
        sys.exit(f"cannot listen on {address}")
    server.start()
    print("serving", flush=True)
    server.wait_for_termination()


def call(channel, method, tally):
    try:
        if method.endswith("/List"):
            list(channel.unary_stream(method)(b"cart", timeout=10))
        else:
            channel.unary_unary(method)(b"cart", timeout=10)
        code = grpc.StatusCode.OK
    except grpc.RpcError as error:
        code = error.code()
    tally[method][code.name] += 1


def main():
    mode, address, n = sys.argv[1], sys.argv[2], int(sys.argv[3] if len(sys.argv) > 3 else 0)
    if mode == "serve":
        return serve(address)
    tally = {method: Counter() for method in METHODS}
    with grpc.insecure_channel(address) as channel:
        if mode == "hold":
            call(channel, METHODS[0], {METHODS[0]: Counter()})
            print("ready", flush=True)
            sys.stdin.readline()
            tally = {METHODS[0]: Counter()}
            for _ in range(n):
                call(channel, METHODS[0], tally)
        else:
            for _ in range(n):
                for method in METHODS:
                    call(channel, method, tally)
    print(json.dumps({m: dict(c) for m, c in tally.items()}))


if __name__ == "__main__":
    main()
