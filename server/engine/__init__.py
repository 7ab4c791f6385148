"""The engine: model repository -> dynamic batchers -> executor -> backends, and the client shared-memory
regions the backends read. In a multi-process server it runs alone in the engine process."""
