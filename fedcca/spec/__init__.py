"""The structure of a network as data: alignment points, the parameter axes they act on, and
how that structure is read from a model (declared by ``alignment_spec()`` or derived from its
fx graph). Depends on torch only; everything above builds on it."""
