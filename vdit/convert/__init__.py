"""Weight conversion from other implementations (diffusers' Wan2.1) into vdit parameters."""
