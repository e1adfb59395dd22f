"""Speed measurements of the FixMatch trainer: ``python -m benchmarks.run [--quick]``.

``run`` is the entry point (flags, then one table); each block of the table is a module of ``sections``;
``common`` holds the table and the timing helpers, ``synthetic`` the inputs, ``workload`` the step under test.
"""
