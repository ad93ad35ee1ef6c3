"""Serving benchmarks against the running stack: arrival processes, the HTTP load driver,
their statistics and the results folder (`specmesh bench load`, `specmesh bench report`).
"""
