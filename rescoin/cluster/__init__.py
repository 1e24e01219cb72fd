"""Cluster balancing (room reserved: TOPSIS, AHP, balancers, migration)."""
