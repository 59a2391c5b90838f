"""The gateway's use cases; routers stay thin and call these."""
