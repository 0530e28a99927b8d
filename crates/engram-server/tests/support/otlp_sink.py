"""A minimal OTLP/gRPC trace receiver for tests: appends every span it receives to a JSONL file.

Usage: otlp_sink.py OUT.jsonl  (prints the loopback port it listens on, then serves until killed)
"""
import json
import sys
from concurrent import futures

import grpc
from google.protobuf.json_format import MessageToDict
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


class Sink(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, path):
        self.path = path

    def Export(self, request, context):
        with open(self.path, "a", encoding="utf-8") as out:
            for resource_spans in request.resource_spans:
                resource = MessageToDict(resource_spans.resource)
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        record = MessageToDict(span)
                        record["traceId"] = span.trace_id.hex()
                        record["spanId"] = span.span_id.hex()
                        record["parentSpanId"] = span.parent_span_id.hex()
                        record["resource"] = resource
                        out.write(json.dumps(record) + "\n")
        return trace_service_pb2.ExportTraceServiceResponse()


def main():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Sink(sys.argv[1]), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
