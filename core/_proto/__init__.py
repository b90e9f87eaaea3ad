"""Generated gRPC code (make proto). Private: import only through core.ipamd_client, core.wire and ipamd's server."""
