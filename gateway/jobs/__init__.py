"""Jobs: the durable state machine that drives a completed series through the stages."""
