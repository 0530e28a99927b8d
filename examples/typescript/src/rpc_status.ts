// Reads google.rpc.Status from the grpc-status-details-bin trailer and the google.rpc.BadRequest
// inside it. The three messages are small, so they are decoded here with the protobuf wire reader
// that the generated code already depends on, instead of bundling googleapis' protos.
import { BinaryReader } from "@bufbuild/protobuf/wire";
import type { ServiceError } from "@grpc/grpc-js";

export interface FieldViolation {
  field: string;
  description: string;
}

interface Any {
  typeUrl: string;
  value: Uint8Array;
}

const STATUS_DETAILS_TRAILER = "grpc-status-details-bin";
const BAD_REQUEST_TYPE_URL = "type.googleapis.com/google.rpc.BadRequest";

/** Calls `onField` for each field of an encoded message; fields it does not read are skipped. */
function readFields(
  bytes: Uint8Array,
  onField: (fieldNo: number, reader: BinaryReader) => boolean,
): void {
  const reader = new BinaryReader(bytes);
  while (reader.pos < reader.len) {
    const [fieldNo, wireType] = reader.tag();
    if (!onField(fieldNo, reader)) {
      reader.skip(wireType, fieldNo);
    }
  }
}

/** google.rpc.Status.details (field 3), each a google.protobuf.Any (type_url 1, value 2). */
function statusDetails(status: Uint8Array): Any[] {
  const details: Any[] = [];
  readFields(status, (fieldNo, reader) => {
    if (fieldNo !== 3) return false;
    const any: Any = { typeUrl: "", value: new Uint8Array() };
    readFields(reader.bytes(), (anyField, anyReader) => {
      if (anyField === 1) any.typeUrl = anyReader.string();
      else if (anyField === 2) any.value = anyReader.bytes();
      else return false;
      return true;
    });
    details.push(any);
    return true;
  });
  return details;
}

/** google.rpc.BadRequest.field_violations (field 1): field (1) and description (2). */
function fieldViolations(badRequest: Uint8Array): FieldViolation[] {
  const violations: FieldViolation[] = [];
  readFields(badRequest, (fieldNo, reader) => {
    if (fieldNo !== 1) return false;
    const violation: FieldViolation = { field: "", description: "" };
    readFields(reader.bytes(), (violationField, violationReader) => {
      if (violationField === 1) violation.field = violationReader.string();
      else if (violationField === 2) violation.description = violationReader.string();
      else return false;
      return true;
    });
    violations.push(violation);
    return true;
  });
  return violations;
}

/** The field violations of the error's google.rpc.BadRequest; empty when it carries none. */
export function badRequestViolations(error: ServiceError): FieldViolation[] {
  const [status] = error.metadata.get(STATUS_DETAILS_TRAILER);
  if (!(status instanceof Buffer)) return [];
  return statusDetails(status)
    .filter((detail) => detail.typeUrl === BAD_REQUEST_TYPE_URL)
    .flatMap((detail) => fieldViolations(detail.value));
}
