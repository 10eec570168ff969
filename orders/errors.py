"""The one domain error tree, and its translation to gRPC status codes with google.rpc details."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status


class DomainError(Exception):
    """A request the system refuses for a reason the client can act on. Never INTERNAL."""

    code: int = code_pb2.FAILED_PRECONDITION

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def details(self) -> list[object]:
        """google.rpc detail messages attached to the status."""
        return []

    def to_status(self) -> grpc.Status:
        packed = []
        for detail in self.details():
            box = any_pb2.Any()
            box.Pack(detail)  # type: ignore[arg-type]
            packed.append(box)
        return rpc_status.to_status(status_pb2.Status(code=self.code, message=self.message, details=packed))


@dataclass(frozen=True)
class FieldViolation:
    """One invalid field: its path in the request (e.g. 'lines[2].quantity') and what is wrong."""

    field: str
    description: str


MAX_REPORTED_VIOLATIONS = 20  # keeps the status within gRPC's 8 KB limit on response metadata
MAX_DESCRIPTION = 200


class InvalidArgument(DomainError):
    """Malformed or out-of-range input; lists the violated fields (the first 20, then a count)."""

    code = code_pb2.INVALID_ARGUMENT

    def __init__(self, violations: list[FieldViolation]) -> None:
        shown = [FieldViolation(v.field[:MAX_DESCRIPTION], v.description[:MAX_DESCRIPTION]) for v in violations]
        if len(shown) > MAX_REPORTED_VIOLATIONS:
            more = len(shown) - MAX_REPORTED_VIOLATIONS + 1
            shown = shown[: MAX_REPORTED_VIOLATIONS - 1] + [FieldViolation("request", f"and {more} more violations")]
        super().__init__(f"invalid request: {', '.join(dict.fromkeys(v.field for v in shown))}")
        self.violations = shown

    def details(self) -> list[object]:
        return [
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                    for v in self.violations
                ]
            )
        ]


class NotFound(DomainError):
    """The order or product named by the request does not exist."""

    code = code_pb2.NOT_FOUND


class FailedPrecondition(DomainError):
    """The system is not in a state that allows the command (short stock, order not PLACED)."""

    code = code_pb2.FAILED_PRECONDITION

    def __init__(self, message: str, violation_type: str, subject: str) -> None:
        super().__init__(message)
        self.violation_type = violation_type
        self.subject = subject

    def details(self) -> list[object]:
        return [
            error_details_pb2.PreconditionFailure(
                violations=[
                    error_details_pb2.PreconditionFailure.Violation(
                        type=self.violation_type, subject=self.subject, description=self.message
                    )
                ]
            )
        ]


class VersionConflict(DomainError):
    """expected_version differs from the aggregate's current version."""

    code = code_pb2.ABORTED

    def __init__(self, aggregate: str, expected: int, current: int) -> None:
        super().__init__(f"{aggregate} is at version {current}, not the expected {expected}")
        self.current = current


class RequestIdReused(DomainError):
    """A request_id was used before with a different payload."""

    code = code_pb2.ALREADY_EXISTS


class Unavailable(DomainError):
    """A dependency is unreachable or the projection is behind; the client may retry."""

    code = code_pb2.UNAVAILABLE


class ResourceExhausted(DomainError):
    """A client exceeded a limit that protects the server (e.g. a watch stream it did not read)."""

    code = code_pb2.RESOURCE_EXHAUSTED
