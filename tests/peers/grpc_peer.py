"""A gRPC server and client for the observe tests, on Python's gRPC (python3-grpcio), with raw
bytes as messages so that no generated code is needed.

    grpc_peer.py serve ADDR [v2]     serves shop.Cart until killed; prints "serving" once bound,
                                     then "METHOD HEX" for each call it gets (the method and
                                     the request message's bytes)
    grpc_peer.py call ADDR N         N calls of each method; prints the codes seen, as JSON
    grpc_peer.py hold ADDR N         one call, "ready", then N more on the same connection once
                                     a line comes on stdin; prints their codes, as JSON

shop.Cart/Get answers OK, shop.Cart/Missing fails NOT_FOUND (in v2 it answers OK),
shop.Cart/List streams three messages then OK.
"""
import json
import sys
import threading
from collections import Counter
from concurrent import futures

import grpc

METHODS = ("/shop.Cart/Get", "/shop.Cart/Missing", "/shop.Cart/List")


# Handlers run on a pool's threads: one line at a time.
PRINTING = threading.Lock()


def logged(method, request):
    with PRINTING:
        print(f"{method} {request.hex()}", flush=True)


def get(request, context):
    logged("/shop.Cart/Get", request)
    return request[::-1]


def missing(v2):
    def handler(request, context):
        logged("/shop.Cart/Missing", request)
        if v2:
            return b"found"
        context.abort(grpc.StatusCode.NOT_FOUND, "no such cart")

    return handler


def listing(request, context):
    logged("/shop.Cart/List", request)
    for i in range(3):
        yield bytes([i]) * 100


def serve(address, v2):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    handlers = {
        "Get": grpc.unary_unary_rpc_method_handler(get),
        "Missing": grpc.unary_unary_rpc_method_handler(missing(v2)),
        "List": grpc.unary_stream_rpc_method_handler(listing),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("shop.Cart", handlers),))
    if server.add_insecure_port(address) == 0:
        sys.exit(f"cannot listen on {address}")
    server.start()
    print("serving", flush=True)
    server.wait_for_termination()


def call(channel, method, tally, message=b"cart"):
    try:
        if method.endswith("/List"):
            list(channel.unary_stream(method)(message, timeout=10))
        else:
            channel.unary_unary(method)(message, timeout=10)
        code = grpc.StatusCode.OK
    except grpc.RpcError as error:
        code = error.code()
    tally[method][code.name] += 1


def main():
    mode, address = sys.argv[1], sys.argv[2]
    if mode == "serve":
        return serve(address, sys.argv[3:] == ["v2"])
    n = int(sys.argv[3])
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
            for i in range(n):
                for method in METHODS:
                    call(channel, method, tally, f"cart {i}".encode())
    print(json.dumps({m: dict(c) for m, c in tally.items()}))


if __name__ == "__main__":
    main()
