"""Shared state of several router replicas (issue 15): settings here, the Redis link in
`router.shared_state.redis_sync`. Importing this package does not import the Redis client."""
