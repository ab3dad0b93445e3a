"""eqprop: Equilibrium Propagation for convergent recurrent networks, in PyTorch."""
__version__ = "0.1.0"
