"""How pushes and parameters travel between a worker and the parameter server.

``protocol`` is the contract both sides import; ``ring`` (gradients in shared memory),
``board`` (parameters in shared memory) and ``channel`` (a node-local socket) are the
node-local fast paths; ``client`` is the worker's seam over them and Ray calls.
"""
