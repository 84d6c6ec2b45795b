"""The pure host side: xenstore paths -> typed events -> host model -> engine -> actions; quotas,
accounting, relabel checks, the label store's model, the audit chain's pure part, xl.cfg parsing.
No Twisted, no sockets, no subprocesses (see docs/architecture.md)."""
