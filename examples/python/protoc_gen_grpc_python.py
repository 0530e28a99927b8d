"""protoc plugin that runs grpcio-tools' gRPC Python generator, for `buf generate`.

grpcio-tools compiles the generator into its bundled protoc (`--grpc_python_out`) and ships no
`protoc-gen-grpc_python` executable, so buf cannot call it as a plugin directly. This plugin reads
buf's CodeGeneratorRequest, hands its descriptors to that bundled protoc and returns the files it
wrote. buf.gen.yaml runs it with the example's virtualenv Python (which has grpcio-tools).
"""

import pathlib
import sys
import tempfile

from google.protobuf import descriptor_pb2
from google.protobuf.compiler import plugin_pb2
from grpc_tools import protoc


def generate(request: plugin_pb2.CodeGeneratorRequest) -> plugin_pb2.CodeGeneratorResponse:
    response = plugin_pb2.CodeGeneratorResponse(
        supported_features=plugin_pb2.CodeGeneratorResponse.FEATURE_PROTO3_OPTIONAL
    )
    with tempfile.TemporaryDirectory() as work_dir:
        work = pathlib.Path(work_dir)
        descriptor_set = work / "request.binpb"
        descriptor_set.write_bytes(
            descriptor_pb2.FileDescriptorSet(file=request.proto_file).SerializeToString()
        )
        out_dir = work / "out"
        out_dir.mkdir()
        out_flag = (
            f"--grpc_python_out={request.parameter}:{out_dir}"
            if request.parameter
            else f"--grpc_python_out={out_dir}"
        )
        exit_code = protoc.main(
            ["protoc", f"--descriptor_set_in={descriptor_set}", out_flag, *request.file_to_generate]
        )
        if exit_code != 0:
            response.error = f"grpc_tools.protoc exited with {exit_code}"
            return response
        for generated in sorted(out_dir.rglob("*.py")):
            response.file.add(
                name=generated.relative_to(out_dir).as_posix(), content=generated.read_text()
            )
    return response


def main() -> None:
    request = plugin_pb2.CodeGeneratorRequest.FromString(sys.stdin.buffer.read())
    sys.stdout.buffer.write(generate(request).SerializeToString())


if __name__ == "__main__":
    main()
