"""Where the bytes live while a run works: calibration activations spilled to unlinked scratch files, and the glibc
heap told to return or keep freed tensor memory."""
