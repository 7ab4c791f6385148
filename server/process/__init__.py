"""Process plumbing shared by the supervisor, the engine process and the front-end processes."""
