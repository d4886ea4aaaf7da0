"""Stateless workers (`tff-amqp worker --stateless`): a silo's pool of
interchangeable workers that take MapReduce work items from the silo's shared
work queue (see `tff_amqp.coordinator.mapreduce` for the coordinator side)."""
