"""The stateful silo agent (`tff-amqp silo`): per-invocation sessions that keep
values between requests, the privacy gate, chunk intake and simulation hosts."""
