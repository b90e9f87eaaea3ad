"""Generated gRPC stubs of etcd's v3 API (make proto, from proto/etcd/). Private: import only through core.etcd."""
