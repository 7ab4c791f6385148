"""Observers of the core's events (``events.Observer``) and the ``/metrics`` endpoint.

Import the modules themselves (``metrics.prometheus``, ``metrics.http``, ``metrics.statistics``) so that
importing one never pulls in the others.
"""
