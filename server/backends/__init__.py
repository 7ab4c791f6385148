"""Backends run one whole batch of NumPy arrays; see base.py for the contract."""
