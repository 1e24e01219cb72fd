"""Offline work: trace loaders, simulation, evaluation, analysis, fitting, history CSV files."""
