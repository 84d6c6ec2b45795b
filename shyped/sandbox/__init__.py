"""Sandbox parts: a real oxenstored without a hypervisor and a libxl-faithful toolstack.

Used by the tests, the demo and the benchmarks; never needed on a real dom0.
"""
