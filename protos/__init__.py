"""Generated KServe v2 / Triton protocol stubs (package ``inference``), in trtserve's own descriptor pool."""
