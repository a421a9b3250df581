"""graceq: active learning over a crystal-structure-prediction landscape.

Decides which force-field minima of a generation pool deserve a reference-level (DFT)
re-minimisation, using a SOAP delta-model committee, Expected Improvement with a
Kriging-Believer batch, and a convergence estimate of the energy window.
"""

__version__ = "0.1.0"
