"""The sections of the benchmark table, one module each, in the table's order:

- ``machine``: 1, the machine and its fp32 matmul rate (the 100 % mark);
- ``augmentation``: 2 and 2b, PIL per image against the batched tensor path, and the device path's kernels;
- ``model_step``: 3, the WRN-28-2 update alone in each layout / compile / precision;
- ``convolutions``: 3b, that step's convolutions alone (the ceiling of a step on this library);
- ``full_step``: 4 and 4b, the whole step through our Engine with its data, and the parts of a step on a GPU;
- ``overhead``: 5, what the Engine and the default handlers add per iteration.

Each ``bench_*`` function adds its rows to a ``benchmarks.common.Table``; ``benchmarks.run`` calls them.
"""
