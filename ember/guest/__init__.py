"""Guest side of ember: kernel and image builds, the agent runtime, the template store."""
