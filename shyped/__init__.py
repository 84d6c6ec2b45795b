"""shyped: sHype-style mandatory access control for Xen, enforced from dom0 via xenstore."""

__version__ = "0.1.0"
