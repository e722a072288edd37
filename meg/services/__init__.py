"""Edge server, device client and policy service over gRPC."""
