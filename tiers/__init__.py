"""Storage media of one node: hbm (GPU memory), host (shared memory), nvme (a preallocated file)."""
