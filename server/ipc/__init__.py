"""Front end <-> engine: the tensor arena (shared memory), the message links, and the message tuples."""
