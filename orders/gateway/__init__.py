"""The HTTP/JSON gateway: the CommandService, QueryService and AdminService contracts over the Connect
protocol (JSON or binary protobuf bodies, server streaming included; gRPC-Web too), forwarded to the gRPC
servers, plus the operator console (static files in console/). Run with `orders gateway`."""
