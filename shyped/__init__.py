"""shyped: sHype-style mandatory access control for Xen, enforced from dom0 at the xenstore layer."""

__version__ = "0.1.0"
