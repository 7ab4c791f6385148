"""Model repository: Triton-layout folders -> validated model specs -> loaded, versioned models."""
