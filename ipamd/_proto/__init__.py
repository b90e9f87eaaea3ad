"""Generated gRPC code (make proto). Private: import only through ipamd.client / ipamd.server."""
