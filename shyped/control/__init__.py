"""The control socket: protocol (pure), backend interface, Twisted server, blocking client."""
