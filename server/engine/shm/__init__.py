"""Client shared-memory regions (Triton's system and CUDA shared-memory extensions), owned by the engine."""
