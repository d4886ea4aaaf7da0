"""The stateless regime: computations in MapReduce form run as work items
that any worker of a silo's pool can take (`tff_amqp.silo.pool`).

`coordinator/stateful/context.py` holds the execution contexts, `round.py` drives one round,
`link.py` is the coordinator's broker connection for work items and
`membership.py` counts a silo live while any of its workers is.
"""
