"""Pool mode, the pure part: the etcd key layout under the configured prefix and the records
stored there, parsed as untrusted input with bounds (docs/pool.md). No I/O: the edge is
`shyped.service.poolstore` over `shyped.service.etcd`."""
