"""rescoin: a predictive multi-resource fairness scheduler for KVM hosts."""
__version__ = "0.1.0"
