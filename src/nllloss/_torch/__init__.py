"""torch's engines (``engines``: which engine computes a problem of torch tensors, and the
computation) and the loss as a differentiable torch function (``autograd``). Imported only
when torch tensors arrive.
"""
