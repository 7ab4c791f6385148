"""Executor: instance slots, each with its own thread (and on the GPU its own stream and buffers)."""
