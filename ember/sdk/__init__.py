"""Python SDK: :class:`Sandbox` (blocking) and :class:`AsyncSandbox` (asyncio)."""
